/// The parameters of one text- or label-to-image generation, named as the Python `generate`.
/// Defaults follow the official sampling script: guidance 3.6, Jacobi blocks of 16 tokens,
/// threshold 1e-3, at most 32 iterations, and the score-step denoise before decoding.
public struct GenerationConfiguration: Hashable, Sendable {
    /// NumPy `RandomState` seed of the noise; image i of a request uses seed + i.
    public var seed: UInt32
    /// Guidance and inversion method, as the sampler takes them.
    public var sampling: SamplingConfiguration
    /// Run the score step (when the export has one) before decoding.
    public var denoise: Bool
    /// Decode the deep block's output and send it as `SampleProgress.preview` (costs one decode).
    public var preview: Bool

    public init(seed: UInt32 = 0, sampling: SamplingConfiguration = SamplingConfiguration(guidance: 3.6, method: .officialJacobi),
                denoise: Bool = true, preview: Bool = false) {
        self.seed = seed
        self.sampling = sampling
        self.denoise = denoise
        self.preview = preview
    }

    /// The classifier-free guidance weight (a shortcut into `sampling`).
    public var guidance: Float {
        get { sampling.guidance }
        set { sampling.guidance = newValue }
    }

    /// The inversion method (a shortcut into `sampling`).
    public var method: SamplingMethod {
        get { sampling.method }
        set { sampling.method = newValue }
    }
}
