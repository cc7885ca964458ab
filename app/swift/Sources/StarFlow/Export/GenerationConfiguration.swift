/// The parameters of one text- or label-to-image generation, named as the Python `generate`.
/// Defaults follow the official sampling script: guidance 3.6, Jacobi blocks of 16 tokens,
/// threshold 1e-3, at most 32 iterations, and the score-step denoise before decoding.
public struct GenerationConfiguration: Hashable, Sendable {
    /// NumPy `RandomState` seed of the noise; image i of a request uses seed + i.
    public var seed: UInt32
    public var guidance: Float
    public var jacobi: Bool
    public var jacobiBlockSize: Int
    public var jacobiThreshold: Float
    public var jacobiMaxIter: Int
    /// Run the score step (when the export has one) before decoding.
    public var denoise: Bool

    public init(seed: UInt32 = 0, guidance: Float = 3.6, jacobi: Bool = true, jacobiBlockSize: Int = 16,
                jacobiThreshold: Float = 1e-3, jacobiMaxIter: Int = 32, denoise: Bool = true) {
        self.seed = seed
        self.guidance = guidance
        self.jacobi = jacobi
        self.jacobiBlockSize = jacobiBlockSize
        self.jacobiThreshold = jacobiThreshold
        self.jacobiMaxIter = jacobiMaxIter
        self.denoise = denoise
    }

    public var sampling: SamplingConfiguration {
        SamplingConfiguration(guidance: guidance, jacobi: jacobi, jacobiBlockSize: jacobiBlockSize,
                              jacobiThreshold: jacobiThreshold, jacobiMaxIter: jacobiMaxIter)
    }
}
