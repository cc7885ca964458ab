#if canImport(CoreML)
import CoreML
import Foundation

/// The exported SD-VAE decoder: a flow latent, divided by the scaling factor, → an image in
/// [−1, 1]. Its input and output are the manifest's names, or else the package's only ones.
/// The package loads on first use and unloads on request.
public final class VAEDecoder: LatentDecoding {
    private struct Loaded {
        let model: MLModel
        let input: String
        let output: String
    }

    private let scalingFactor: Float
    private let path: String
    private let loaded: ManagedResource<Loaded>

    init(package: CoreMLPackage, manifest: ExportManifest, computeUnits: ComputeUnits) throws {
        guard let vae = manifest.vae else {
            throw StarFlowError.invalidFile(path: package.url.path, problem: "the manifest has no vae entry")
        }
        let path = package.url.path
        self.path = path
        scalingFactor = vae.scalingFactor
        loaded = ManagedResource(name: vae.package) {
            let model = try package.load(function: nil, computeUnits: computeUnits)
            let declared = CoreMLPackage.interface(of: model)
            guard let input = vae.input ?? (declared.inputs.count == 1 ? declared.inputs.keys.first : nil),
                  let output = vae.output ?? (declared.outputs.count == 1 ? declared.outputs.keys.first : nil) else {
                throw StarFlowError.interfaceMismatch(path: path, problem: "the manifest names no decoder input/output and the package has \(declared.inputs.keys.sorted()) → \(declared.outputs.keys.sorted())")
            }
            try declared.check(against: manifest.decoderInterface(input: input, output: output), path: path, function: "main")
            return Loaded(model: model, input: input, output: output)
        }
    }

    public func loadResources() throws { try loaded.loadResources() }
    public func unloadResources() { loaded.unloadResources() }

    /// The image (1, 3, H, W) for a flow latent (1, C, h, w).
    public func decode(_ latent: Tensor) throws -> Tensor {
        try loaded.perform { loaded in
            let scaled = Tensor(shape: latent.shape, values: latent.values.map { $0 / scalingFactor })
            let array = try MLMultiArray.make(scaled, dataType: CoreMLPackage.dataType(of: loaded.model, input: loaded.input))
            return try readOutput(loaded.output, of: predict(loaded.model, [loaded.input: array], state: nil, path: path), path: path)
        }
    }
}
#endif
