/// Inverting one block given its noise z (rows, N, C·p²) in the block's own order.
struct BlockInversion {
    let block: any FlowBlock
    let rows: Int
    let prefix: Int
    let guidance: Float?
    let useSoftplus: Bool

    /// x_t = z_t·σ_t + μ_t, one token per pass, each predicted from the tokens before it.
    func sequential(_ z: [Float], run: inout SamplingRun) throws -> [Float] {
        let channels = block.tokenChannels, count = block.tokenCount
        var previous = Array(repeatingRows: block.sos, rows)
        var x = [Float](repeating: 0, count: z.count)
        for t in 0..<count {
            try run.checkCancellation()
            let (a, b) = try block.step(tokens: Tensor(shape: [rows, 1, channels], values: previous), position: prefix + t)
            let noise = chunk(z, start: t, size: 1, count: count)
            previous = GaussianStep.colour(noise: noise, scaleLogit: a.values, shift: b.values, rows: rows,
                                           guidance: guidance, useSoftplus: useSoftplus)
            write(previous, into: &x, start: t, size: 1, count: count)
            try run.pass(tokensDone: t + 1)
        }
        return x
    }

    /// The block's tokens for noise `z` by `method`, and the Jacobi chunks' trace (empty for sequential).
    func invert(_ z: [Float], method: SamplingMethod, run: inout SamplingRun) throws -> ([Float], [JacobiChunk]) {
        switch method {
        case .sequential:
            return (try sequential(z, run: &run), [])
        case let .jacobi(blockSize, threshold, maxIter, coupled):
            return try jacobi(z, blockSize: blockSize, threshold: threshold, maxIter: maxIter, coupled: coupled, run: &run)
        }
    }

    /// Block-wise Jacobi iteration from the noise itself (official `MetaBlock.jacobi`): each chunk
    /// is recomputed from the previous iterate until its relative change drops below the
    /// threshold, or for at most `maxIter` passes.
    ///
    /// Per image (the default), an image stops as soon as its own change is small: its tokens are
    /// kept and its rows are fed the inputs of its last pass again, so the cache holds exactly what
    /// sampling it alone leaves there, and the image equals the same seed sampled alone. Coupled
    /// (the official rule), the change is measured over the whole batch. A chunk's trace records,
    /// per pass, the largest change among the images still iterating.
    func jacobi(_ z: [Float], blockSize: Int, threshold: Float, maxIter: Int, coupled: Bool,
                run: inout SamplingRun) throws -> ([Float], [JacobiChunk]) {
        let channels = block.tokenChannels, count = block.tokenCount
        let groups = convergenceGroups(coupled: coupled)
        var iterate = prependingSOS(block.sos, to: z, count: count)
        var chunks: [JacobiChunk] = []
        for start in stride(from: 0, to: count, by: blockSize) {
            let size = min(blockSize, count - start)
            let rowWidth = size * channels
            var inputs = chunk(iterate, start: start, size: size, count: count + 1)
            var active = [Bool](repeating: true, count: groups.count)
            var changes: [Float] = []
            for _ in 0..<maxIter {
                try run.checkCancellation()
                let (a, b) = try block.step(tokens: Tensor(shape: [rows, size, channels], values: inputs), position: prefix + start)
                let new = GaussianStep.colour(noise: chunk(z, start: start, size: size, count: count), scaleLogit: a.values,
                                              shift: b.values, rows: rows, guidance: guidance, useSoftplus: useSoftplus)
                var updated = chunk(iterate, start: start + 1, size: size, count: count + 1)
                var largest: Float = 0
                for (group, members) in groups.enumerated() where active[group] {
                    let change = GaussianStep.relativeChange(new: Self.rows(members, of: new, width: rowWidth),
                                                             old: Self.rows(members, of: updated, width: rowWidth))
                    largest = change.isNaN || largest.isNaN ? .nan : max(largest, change)
                    for row in members {
                        updated[(row * rowWidth)..<((row + 1) * rowWidth)] = new[(row * rowWidth)..<((row + 1) * rowWidth)]
                    }
                    if change < threshold { active[group] = false }
                }
                changes.append(largest)
                write(updated, into: &iterate, start: start + 1, size: size, count: count + 1)
                try run.pass(tokensDone: start + size)
                guard active.contains(true) else { break }
                let fresh = chunk(iterate, start: start, size: size, count: count + 1)
                for (group, members) in groups.enumerated() where active[group] {
                    for row in members {
                        inputs[(row * rowWidth)..<((row + 1) * rowWidth)] = fresh[(row * rowWidth)..<((row + 1) * rowWidth)]
                    }
                }
            }
            chunks.append(JacobiChunk(start: start, size: size, changes: changes))
        }
        return (dropSOS(iterate, count: count), chunks)
    }

    /// The rows whose change decides together: all rows when coupled, else each image's rows
    /// (row i, and with guidance also its unconditional row images + i).
    private func convergenceGroups(coupled: Bool) -> [[Int]] {
        if coupled { return [Array(0..<rows)] }
        guard guidance != nil else { return (0..<rows).map { [$0] } }
        let images = rows / 2
        return (0..<images).map { [$0, images + $0] }
    }

    /// Rows `members` (in order) of a (rows, n, C) chunk whose rows are `width` values wide.
    private static func rows(_ members: [Int], of values: [Float], width: Int) -> [Float] {
        members.flatMap { values[($0 * width)..<(($0 + 1) * width)] }
    }

    /// Tokens start..<start+size of every row of a (rows, count, C) sequence.
    private func chunk(_ sequence: [Float], start: Int, size: Int, count: Int) -> [Float] {
        let channels = block.tokenChannels
        var values: [Float] = []
        values.reserveCapacity(rows * size * channels)
        for row in 0..<rows {
            let first = (row * count + start) * channels
            values.append(contentsOf: sequence[first..<(first + size * channels)])
        }
        return values
    }

    private func write(_ values: [Float], into sequence: inout [Float], start: Int, size: Int, count: Int) {
        let channels = block.tokenChannels, width = size * channels
        for row in 0..<rows {
            let target = (row * count + start) * channels
            sequence[target..<(target + width)] = values[(row * width)..<((row + 1) * width)]
        }
    }

    /// [sos, z_0, …, z_{N−1}] for every row.
    private func prependingSOS(_ sos: [Float], to tokens: [Float], count: Int) -> [Float] {
        let width = count * block.tokenChannels
        var values: [Float] = []
        values.reserveCapacity(rows * (width + sos.count))
        for row in 0..<rows {
            values.append(contentsOf: sos)
            values.append(contentsOf: tokens[(row * width)..<((row + 1) * width)])
        }
        return values
    }

    /// Drops the SOS token from every row of [sos, x_0, …, x_{N−1}].
    private func dropSOS(_ iterate: [Float], count: Int) -> [Float] {
        let channels = block.tokenChannels
        var values: [Float] = []
        values.reserveCapacity(rows * count * channels)
        for row in 0..<rows {
            let first = (row * (count + 1) + 1) * channels
            values.append(contentsOf: iterate[first..<(first + count * channels)])
        }
        return values
    }
}

private extension Array where Element == Float {
    init(repeatingRows row: [Float], _ rows: Int) {
        self = []
        for _ in 0..<rows { append(contentsOf: row) }
    }
}
