import Foundation

/// The RoPE rows and causal mask a `--step-tables` export takes as step inputs, so its steps
/// have no runtime gather (friendlier to the Neural Engine): the block's table (cache length ×
/// head_dim, cos then sin) is read once; each call gets the rows position…position+n−1 and the
/// additive mask (n, cache length), 0 where a key index ≤ the query's position, else −3e4.
public struct StepTables: Sendable, Equatable {
    /// The exporter's additive mask value (its exp() is 0 in float16 and float32).
    public static let blocked: Float = -3.0e4

    public let cos: [Float]
    public let sin: [Float]
    public let rows: Int
    public let headDim: Int

    public init(cos: [Float], sin: [Float], rows: Int, headDim: Int) throws {
        guard cos.count == rows * headDim, sin.count == rows * headDim else {
            throw StarFlowError.invalidArgument("a RoPE table of \(rows) × \(headDim) needs \(rows * headDim) values per half")
        }
        self.cos = cos
        self.sin = sin
        self.rows = rows
        self.headDim = headDim
    }

    /// The table file of `block` in `folder`.
    public init(block: ExportManifest.Block, folder: URL) throws {
        guard let spec = block.stepTables else {
            throw StarFlowError.invalidArgument("\(block.package) takes no step tables")
        }
        let url = folder.appendingPathComponent(spec.file)
        guard let data = FileManager.default.contents(atPath: url.path) else {
            throw StarFlowError.fileNotFound(path: url.path, fix: "export the model again with --step-tables")
        }
        let half = block.cacheLength * spec.headDim
        guard data.count == 2 * half * 4 else {
            throw StarFlowError.invalidFile(path: url.path, problem: "holds \(data.count) bytes, expected 2 × \(block.cacheLength) × \(spec.headDim) float32")
        }
        let values: [Float] = data.withUnsafeBytes { raw in
            (0..<(2 * half)).map { Float(bitPattern: UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: $0 * 4, as: UInt32.self))) }
        }
        try self.init(cos: Array(values[..<half]), sin: Array(values[half...]), rows: block.cacheLength, headDim: spec.headDim)
    }

    /// (cos rows, sin rows, mask) for a chunk of `count` tokens whose first sits at cache `position`.
    public func inputs(position: Int, count: Int) throws -> (cos: Tensor, sin: Tensor, mask: Tensor) {
        guard position >= 0, position + count <= rows else {
            throw StarFlowError.invalidArgument("a chunk of \(count) at position \(position) runs past the \(rows) table rows")
        }
        let span = (position * headDim)..<((position + count) * headDim)
        var mask = [Float](repeating: Self.blocked, count: count * rows)
        for query in 0..<count {
            for key in 0...(position + query) { mask[query * rows + key] = 0 }
        }
        return (Tensor(shape: [count, headDim], values: Array(cos[span])), Tensor(shape: [count, headDim], values: Array(sin[span])),
                Tensor(shape: [count, rows], values: mask))
    }
}
