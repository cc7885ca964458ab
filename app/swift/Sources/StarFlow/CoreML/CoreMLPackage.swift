#if canImport(CoreML)
import CoreML
import Foundation

/// One model of an export (`.mlpackage`, or `.mlmodelc` as an app bundles it), compiled once
/// through the `CompiledModelCache` and loaded per function with the caller's compute units.
/// Loading never guesses names: each function's declared inputs and outputs are compared with
/// what the manifest promises.
struct CoreMLPackage: Sendable {
    let url: URL
    private let compiledURL: URL

    /// The model the manifest calls `name` in `folder`, compiled (or taken as compiled) via `cache`.
    static func prepare(_ name: String, in folder: URL, cache: CompiledModelCache) async throws -> CoreMLPackage {
        guard let url = ExportManifest.modelURL(named: name, in: folder) else {
            throw StarFlowError.fileNotFound(path: folder.appendingPathComponent(name).path, fix: "export the model again")
        }
        do {
            let compiled = try await cache.compiledModel(at: url) { try await MLModel.compileModel(at: $0) }
            return CoreMLPackage(url: url, compiledURL: compiled)
        } catch let error as StarFlowError {
            throw error
        } catch {
            throw StarFlowError.coreMLFailure(path: url.path, message: "cannot compile: \(error.localizedDescription)")
        }
    }

    /// The model for `function` (nil: the package's only or default function).
    func load(function: String?, computeUnits: ComputeUnits) throws -> MLModel {
        let configuration = MLModelConfiguration()
        configuration.computeUnits = computeUnits.coreML
        if let function { configuration.functionName = function }
        do {
            return try MLModel(contentsOf: compiledURL, configuration: configuration)
        } catch {
            throw StarFlowError.coreMLFailure(path: url.path, message: "cannot load function \(function ?? "main"): \(error.localizedDescription)")
        }
    }

    /// Loads `function` and checks that it declares `expected`.
    func load(function: String?, computeUnits: ComputeUnits, expecting expected: ModelInterface) throws -> MLModel {
        let model = try load(function: function, computeUnits: computeUnits)
        try Self.interface(of: model).check(against: expected, path: url.path, function: function ?? "main")
        return model
    }

    /// The multi-array inputs and outputs `model` declares (states are not inputs).
    static func interface(of model: MLModel) -> ModelInterface {
        func shapes(_ features: [String: MLFeatureDescription]) -> [String: [Int?]] {
            features.filter { $0.value.type == .multiArray }.mapValues { feature in
                (feature.multiArrayConstraint?.shape ?? []).map { Optional($0.intValue) }
            }
        }
        let description = model.modelDescription
        return ModelInterface(inputs: shapes(description.inputDescriptionsByName), outputs: shapes(description.outputDescriptionsByName))
    }

    /// The data type `model` declares for input `name` (Float32 when it says nothing).
    static func dataType(of model: MLModel, input name: String) -> MLMultiArrayDataType {
        model.modelDescription.inputDescriptionsByName[name]?.multiArrayConstraint?.dataType ?? .float32
    }
}

extension ComputeUnits {
    var coreML: MLComputeUnits {
        switch self {
        case .all: return .all
        case .cpuAndGPU: return .cpuAndGPU
        case .cpuAndNeuralEngine: return .cpuAndNeuralEngine
        case .cpuOnly: return .cpuOnly
        }
    }
}

/// Runs a prediction, turning Core ML's error into one naming the package.
func predict(_ model: MLModel, _ inputs: [String: MLMultiArray], state: MLState?, path: String) throws -> MLFeatureProvider {
    do {
        let provider = try MLDictionaryFeatureProvider(dictionary: inputs.mapValues { MLFeatureValue(multiArray: $0) })
        if let state { return try model.prediction(from: provider, using: state) }
        return try model.prediction(from: provider)
    } catch let error as StarFlowError {
        throw error
    } catch {
        throw StarFlowError.coreMLFailure(path: path, message: error.localizedDescription)
    }
}

/// Output `name` of a prediction as a Tensor.
func readOutput(_ name: String, of result: MLFeatureProvider, path: String) throws -> Tensor {
    guard let array = result.featureValue(for: name)?.multiArrayValue else {
        throw StarFlowError.interfaceMismatch(path: path, problem: "the prediction has no multi-array output \(name)")
    }
    return try array.tensor()
}

/// Output `name` of a prediction as the array itself, to hand on to the next package.
func readArray(_ name: String, of result: MLFeatureProvider, path: String) throws -> MLMultiArray {
    guard let array = result.featureValue(for: name)?.multiArrayValue else {
        throw StarFlowError.interfaceMismatch(path: path, problem: "the prediction has no multi-array output \(name)")
    }
    return array
}
#endif
