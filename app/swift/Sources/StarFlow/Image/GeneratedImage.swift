/// A generated image with what produced it, so it can be saved, shown or reproduced.
public struct GeneratedImage: Sendable {
    public let image: RGBImage
    public let prompt: String
    public let configuration: GenerationConfiguration
}
