/// Where sampling stands, reported after every model pass.
public struct SampleProgress: Sendable {
    /// Index of the block being inverted (forward order; the deep block runs first).
    public let block: Int
    /// 0-based position of that block in the sampling order, of `stageCount`.
    public let stage: Int
    public let stageCount: Int
    public let tokensDone: Int
    public let tokensTotal: Int
    /// Model passes so far in this block (one per token, or one per Jacobi iteration).
    public let passes: Int
    /// Seconds since sampling started.
    public let elapsed: Double
    /// The decoded image after the deep block, in the one extra report sent when a generation
    /// asks for a preview (`GenerationConfiguration.preview`); nil otherwise.
    public internal(set) var preview: RGBImage? = nil
}
