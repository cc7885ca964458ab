#if canImport(CoreML)
import CoreML
import Foundation

/// The exported T5 encoder: token ids and mask (rows, L) → text states (rows, L, D), with padded
/// positions set to exactly zero as the official `encode_text` does (the flow was trained so).
/// An encoder split by layers into several packages runs them in order, passing `hidden` on.
/// The packages load on first use and unload on request.
public final class TextEncoder: ResourceManaging {
    private let spec: ExportManifest.TextEncoder
    private let models: ManagedResource<[(path: String, model: MLModel)]>

    init(packages: [CoreMLPackage], manifest: ExportManifest, computeUnits: ComputeUnits) throws {
        guard let spec = manifest.textEncoder else {
            throw StarFlowError.invalidFile(path: ExportManifest.fileName, problem: "the manifest has no text_encoder entry")
        }
        self.spec = spec
        models = ManagedResource(name: spec.package) {
            try packages.enumerated().map { part, package in
                guard let expected = manifest.textEncoderInterface(part: part) else {
                    throw StarFlowError.invalidFile(path: ExportManifest.fileName, problem: "a text encoder needs a text condition")
                }
                return (package.url.path, try package.load(function: nil, computeUnits: computeUnits, expecting: expected))
            }
        }
    }

    public func loadResources() throws { try models.loadResources() }
    public func unloadResources() { models.unloadResources() }

    /// States of each tokenized caption, stacked in order: (captions.count, L, D).
    public func encode(_ captions: [TokenizedText]) throws -> Tensor {
        try models.perform { models in
            let declared = models.first.map { CoreMLPackage.interface(of: $0.model).inputs[spec.inputs.inputIds] } ?? nil
            let batch = declared?.first.flatMap { $0 } ?? 1
            var parts: [Tensor] = []
            for start in stride(from: 0, to: captions.count, by: batch) {
                let group = Array(captions[start..<min(start + batch, captions.count)])
                guard group.count == batch else {
                    throw StarFlowError.invalidArgument("the text encoder takes \(batch) captions at a time; got \(captions.count)")
                }
                parts.append(try encodeBatch(group, models: models))
            }
            return Tensor.concatenatingRows(parts)
        }
    }

    private func encodeBatch(_ captions: [TokenizedText], models: [(path: String, model: MLModel)]) throws -> Tensor {
        let length = captions[0].inputIds.count
        let mask = [spec.inputs.attentionMask: try MLMultiArray.make(int32: captions.flatMap(\.attentionMask), shape: [captions.count, length])]
        var inputs = [spec.inputs.inputIds: try MLMultiArray.make(int32: captions.flatMap(\.inputIds), shape: [captions.count, length])]
        var states: Tensor?
        for (path, model) in models {
            let result = try predict(model, inputs.merging(mask) { current, _ in current }, state: nil, path: path)
            if let hidden = spec.hidden, let array = result.featureValue(for: hidden.output)?.multiArrayValue {
                inputs = [hidden.input: array]
            } else {
                states = try readOutput(spec.output, of: result, path: path)
            }
        }
        guard var states else {
            throw StarFlowError.interfaceMismatch(path: models.last?.path ?? spec.package, problem: "no package gave the output \(spec.output)")
        }
        let width = states.shape[2]
        for (row, caption) in captions.enumerated() {
            for (position, kept) in caption.attentionMask.enumerated() where kept == 0 {
                let start = (row * length + position) * width
                for index in start..<(start + width) { states.values[index] = 0 }
            }
        }
        return states
    }
}

/// A text model's condition: the prompt and the empty prompt, tokenized and encoded by T5.
final class TextCondition: ConditionEncoding {
    private let tokenizer: T5Tokenizer
    private let encoder: TextEncoder
    private let length: Int

    init(tokenizer: T5Tokenizer, encoder: TextEncoder, length: Int) {
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.length = length
    }

    func condition(for prompt: String) throws -> Tensor {
        try encoder.encode([try tokenizer.encode(prompt, length: length), try tokenizer.encode("", length: length)])
    }

    func loadResources() throws { try encoder.loadResources() }
    func unloadResources() { encoder.unloadResources() }
}
#endif
