/// Turns a prompt into the deep block's condition rows: the prompt's, then the empty prompt's, (2, T, D).
public protocol ConditionEncoding: ResourceManaging {
    func condition(for prompt: String) throws -> Tensor
}

/// Turns a flow latent (1, C, h, w) into an image (1, 3, H, W) in [−1, 1].
public protocol LatentDecoding: ResourceManaging {
    func decode(_ latent: Tensor) throws -> Tensor
}

/// A label model's condition: one-hot rows, nothing to load.
public final class LabelCondition: ConditionEncoding {
    public let encoder: LabelEncoder

    public init(encoder: LabelEncoder) {
        self.encoder = encoder
    }

    public func condition(for prompt: String) throws -> Tensor { try encoder.oneHot([prompt, ""]) }
    public func loadResources() throws {}
    public func unloadResources() {}
}
