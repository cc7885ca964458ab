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

    /// Block-wise Jacobi iteration from the noise itself (official `MetaBlock.jacobi`): each chunk
    /// is recomputed from the previous iterate until its relative change drops below the
    /// threshold, or for at most `jacobiMaxIter` passes.
    func jacobi(_ z: [Float], configuration: SamplingConfiguration, run: inout SamplingRun) throws -> ([Float], [JacobiChunk]) {
        let channels = block.tokenChannels, count = block.tokenCount
        var iterate = prependingSOS(block.sos, to: z, count: count)
        var chunks: [JacobiChunk] = []
        for start in stride(from: 0, to: count, by: configuration.jacobiBlockSize) {
            let size = min(configuration.jacobiBlockSize, count - start)
            var changes: [Float] = []
            for _ in 0..<configuration.jacobiMaxIter {
                try run.checkCancellation()
                let inputs = chunk(iterate, start: start, size: size, count: count + 1)
                let (a, b) = try block.step(tokens: Tensor(shape: [rows, size, channels], values: inputs), position: prefix + start)
                let new = GaussianStep.colour(noise: chunk(z, start: start, size: size, count: count), scaleLogit: a.values,
                                              shift: b.values, rows: rows, guidance: guidance, useSoftplus: useSoftplus)
                changes.append(GaussianStep.relativeChange(new: new, old: chunk(iterate, start: start + 1, size: size, count: count + 1)))
                write(new, into: &iterate, start: start + 1, size: size, count: count + 1)
                try run.pass(tokensDone: start + size)
                if changes[changes.count - 1] < configuration.jacobiThreshold { break }
            }
            chunks.append(JacobiChunk(start: start, size: size, changes: changes))
        }
        return (dropSOS(iterate, count: count), chunks)
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
