/// How to invert the flow: token by token, or by block-wise Jacobi iteration. The names and
/// defaults are those of the MLX runtime's `sample`.
public struct SamplingConfiguration: Hashable, Sendable {
    /// Classifier-free guidance weight on the deep block; needs conditional then unconditional rows.
    public var guidance: Float
    public var jacobi: Bool
    public var jacobiBlockSize: Int
    public var jacobiThreshold: Float
    public var jacobiMaxIter: Int

    public init(guidance: Float = 0, jacobi: Bool = false, jacobiBlockSize: Int = 16,
                jacobiThreshold: Float = 1e-3, jacobiMaxIter: Int = 32) {
        self.guidance = guidance
        self.jacobi = jacobi
        self.jacobiBlockSize = jacobiBlockSize
        self.jacobiThreshold = jacobiThreshold
        self.jacobiMaxIter = jacobiMaxIter
    }
}
