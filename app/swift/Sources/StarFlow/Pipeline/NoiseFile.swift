import Foundation

/// A noise file written by `starflow invert` (Python `mlx_starflow.noise_file`): one float32
/// tensor `noise` (images, channels, height, width) in latent space, and string metadata naming
/// the model, the image size and the prompts it was inverted under. Sampling from it (rather
/// than from a seed) reproduces or edits the inverted image; reading it checks everything that
/// would otherwise sample garbage, as the Python reader does.
public struct NoiseFile: Sendable {
    public static let tensorName = "noise"

    /// All images' noise, (images, channels, height, width).
    public let noise: Tensor
    /// The writer's metadata: `format`, `model`, `size` ("WxH"), `vae`, `prompts` (a JSON list).
    public let metadata: [String: String]
    public let path: String

    public init(contentsOf url: URL) throws {
        let file = try SafeTensorsFile(contentsOf: url)
        path = url.path
        guard file.names == [Self.tensorName] else {
            throw StarFlowError.invalidFile(path: path, problem: "holds \(file.names), not one tensor named \"noise\"; pass a file written by `starflow invert`")
        }
        guard let entry = file.entries[Self.tensorName], entry.dtype == .f32 else {
            throw StarFlowError.invalidFile(path: path, problem: "the noise is not float32; write it as float32")
        }
        guard entry.shape.count == 4 else {
            throw StarFlowError.invalidFile(path: path, problem: "the noise has shape \(entry.shape); it must be (images, channels, height, width)")
        }
        noise = try file.tensor(Self.tensorName)
        guard noise.values.allSatisfy(\.isFinite) else {
            throw StarFlowError.invalidFile(path: path, problem: "the noise holds NaN or infinite values, which sample blank images; invert the image again")
        }
        metadata = file.metadata
    }

    /// Images in the file.
    public var imageCount: Int { noise.shape[0] }

    /// The model the noise was inverted with, when the writer recorded it.
    public var model: String? { metadata["model"] }

    /// One image's noise, (1, channels, height, width): what `generate(prompt:noise:)` takes.
    public func image(_ index: Int) throws -> Tensor {
        guard (0..<imageCount).contains(index) else {
            throw StarFlowError.invalidArgument("\(path) holds \(imageCount) image(s); image \(index) does not exist (count from 0)")
        }
        return noise.rows(index..<index + 1)
    }

    /// Refuses noise inverted with another model (by the export's model name), when both names are known.
    public func check(model expected: String?) throws {
        if let model, let expected, model != expected {
            throw StarFlowError.invalidArgument("\(path) was made with model \"\(model)\", not \"\(expected)\"; use that model's export or invert again")
        }
    }
}
