/// The sample and the trace of every block, in sampling order (deep block first).
public struct SampleResult: Sendable {
    public let sample: Tensor
    public let blocks: [BlockTrace]
}

/// What one block produced: its output (B, C, H, W) and, for Jacobi, every chunk's iterations.
public struct BlockTrace: Sendable {
    public let block: Int
    public let output: Tensor
    public let jacobiChunks: [JacobiChunk]
}

/// One Jacobi chunk: where it starts in the block's token order, its size, and each
/// iteration's relative change (the official convergence value).
public struct JacobiChunk: Equatable, Sendable {
    public let start: Int
    public let size: Int
    public let changes: [Float]

    public var iterations: Int { changes.count }
}
