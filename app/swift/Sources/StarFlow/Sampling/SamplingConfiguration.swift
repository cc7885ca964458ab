/// How to invert a block: token by token, or by block-wise Jacobi iteration. The cases mirror
/// the MLX runtime's samplers, `Sequential()` and `Jacobi(block_size, threshold, max_iter)`;
/// a new sampler is one new case here and its loop in `BlockInversion`.
public enum SamplingMethod: Hashable, Sendable {
    case sequential
    /// Chunks of `blockSize` tokens, each iterated until its relative change is below
    /// `threshold` or for `maxIter` passes. Convergence is decided per image, so an image of a
    /// batch equals the same seed sampled alone; `coupled` restores the official rule, where
    /// the whole batch iterates until the batch's change is below the threshold.
    case jacobi(blockSize: Int = 16, threshold: Float = 1e-3, maxIter: Int = 32, coupled: Bool = false)

    /// The official sampling script's choice: Jacobi, blocks of 16, threshold 1e-3, 32 passes.
    public static let officialJacobi = SamplingMethod.jacobi()

    /// Rejects settings no loop can run: a Jacobi block or pass count below 1, a negative threshold.
    public func validate() throws {
        guard case let .jacobi(blockSize, threshold, maxIter, _) = self else { return }
        guard blockSize >= 1, maxIter >= 1 else {
            throw StarFlowError.invalidArgument("Jacobi blockSize and maxIter must be at least 1, got \(blockSize) and \(maxIter)")
        }
        guard threshold >= 0 else {
            throw StarFlowError.invalidArgument("the Jacobi threshold must not be negative, got \(threshold)")
        }
    }

    /// One line for progress text and image metadata, e.g. `jacobi(block 16, threshold 0.001, max 32 iterations)`.
    public var summary: String {
        switch self {
        case .sequential:
            return "sequential"
        case let .jacobi(blockSize, threshold, maxIter, coupled):
            return "jacobi(block \(blockSize), threshold \(threshold), max \(maxIter) iterations\(coupled ? ", coupled" : ""))"
        }
    }
}

/// What the sampler needs besides the noise and the condition: the guidance weight and the
/// inversion method. Defaults are those of the MLX runtime's `sample`: no guidance, sequential.
public struct SamplingConfiguration: Hashable, Sendable {
    /// Classifier-free guidance weight on the deep block; needs conditional then unconditional rows.
    public var guidance: Float
    public var method: SamplingMethod

    public init(guidance: Float = 0, method: SamplingMethod = .sequential) {
        self.guidance = guidance
        self.method = method
    }
}
