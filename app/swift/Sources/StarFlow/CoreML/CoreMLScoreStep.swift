#if canImport(CoreML)
import CoreML
import Foundation

/// The exported score step (the official self-denoising): latent and conditional text states →
/// the denoised latent x − σ²·∇ₓ[D·nll(x)].
public final class CoreMLScoreStep: ScoreFunction {
    private let spec: ExportManifest.ScoreStep
    private let model: MLModel
    private let path: String

    init(package: CoreMLPackage, manifest: ExportManifest, computeUnits: ComputeUnits) throws {
        guard let spec = manifest.scoreStep, let expected = manifest.scoreStepInterface() else {
            throw StarFlowError.invalidFile(path: package.url.path, problem: "the manifest has no score_step entry")
        }
        self.spec = spec
        path = package.url.path
        model = try package.load(function: nil, computeUnits: computeUnits, expecting: expected)
    }

    public func denoised(latent: Tensor, condition: Tensor?) throws -> Tensor {
        var inputs = [spec.inputs.latent: try MLMultiArray.make(latent, dataType: CoreMLPackage.dataType(of: model, input: spec.inputs.latent))]
        if let name = spec.inputs.text {
            guard let condition else {
                throw StarFlowError.invalidArgument("\(path) needs the conditional text states")
            }
            inputs[name] = try MLMultiArray.make(condition, dataType: CoreMLPackage.dataType(of: model, input: name))
        }
        return try readOutput(spec.output, of: predict(model, inputs, state: nil, path: path), path: path)
    }
}
#endif
