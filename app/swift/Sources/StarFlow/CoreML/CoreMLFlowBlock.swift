#if canImport(CoreML)
import CoreML
import Foundation

/// A flow block exported as stateful Core ML: one function per chunk size (and a prefill
/// function for the deep block) sharing the weights and the KV cache state of their package.
/// A block split by layers into several packages runs them in order, each with its own state,
/// passing the hidden state on. `reset` makes fresh states; a chunk smaller than the smallest
/// fitting function is padded with zeros, whose keys land in cache slots no real query reads,
/// and the padded outputs are dropped.
public final class CoreMLFlowBlock: FlowBlock {
    /// One package of the block: its step models by chunk size, its prefill model, its state.
    private struct Part {
        let path: String
        let steps: [(size: Int, model: MLModel)]
        let prefill: MLModel?
        var state: MLState?
    }

    public let spec: ExportManifest.Block
    public var sos: [Float] { spec.sos }
    public var flipped: Bool { spec.flipped }
    public var hasText: Bool { spec.hasText }
    public var tokenChannels: Int { spec.tokenChannels }
    public var tokenCount: Int { spec.tokens }
    public var maxChunkSize: Int { spec.stepFunctions.last?.size ?? 0 }

    private var parts: [Part]

    init(packages: [CoreMLPackage], spec: ExportManifest.Block, manifest: ExportManifest, computeUnits: ComputeUnits) throws {
        self.spec = spec
        parts = try packages.enumerated().map { part, package in
            let steps = try spec.stepFunctions.map { size, name in
                (size, try package.load(function: name, computeUnits: computeUnits,
                                        expecting: manifest.stepInterface(of: spec, chunk: size, part: part)))
            }
            var prefill: MLModel?
            if let name = spec.functions.prefill, let expected = manifest.prefillInterface(of: spec, part: part) {
                prefill = try package.load(function: name, computeUnits: computeUnits, expecting: expected)
            }
            return Part(path: package.url.path, steps: steps, prefill: prefill, state: nil)
        }
    }

    public func reset(rows: Int) throws {
        guard rows == spec.rows else {
            throw StarFlowError.invalidArgument("\(spec.package) was exported for \(spec.rows) rows, not \(rows)")
        }
        for index in parts.indices {
            guard let first = parts[index].steps.first?.model else {
                throw StarFlowError.interfaceMismatch(path: parts[index].path, problem: "the package has no step function")
            }
            parts[index].state = first.makeState()
        }
    }

    public func prefill(text: Tensor) throws {
        guard let input = spec.inputs.text, let model = parts.first?.prefill else {
            throw StarFlowError.invalidArgument("\(spec.package) has no prefill function; only the deep block reads the condition")
        }
        let array = try MLMultiArray.make(text, dataType: CoreMLPackage.dataType(of: model, input: input))
        _ = try runChain(first: [input: array], shared: [:]) { $0.prefill }
    }

    public func step(tokens: Tensor, position: Int) throws -> (scaleLogit: Tensor, shift: Tensor) {
        let count = tokens.shape[1]
        guard let size = spec.stepFunctions.map(\.size).first(where: { $0 >= count }), let firstStep = parts.first?.steps else {
            throw StarFlowError.invalidArgument("\(spec.package) has no step function for \(count) tokens (largest \(maxChunkSize))")
        }
        let model = try Self.model(firstStep, size: size)
        let padded = Self.padded(tokens, to: size)
        let inputs = [spec.inputs.tokens: try MLMultiArray.make(padded, dataType: CoreMLPackage.dataType(of: model, input: spec.inputs.tokens))]
        let position = [spec.inputs.position: try MLMultiArray.make(int32: [Int32(position)], shape: [1])]
        let result = try runChain(first: inputs, shared: position) { try Self.model($0.steps, size: size) }
        let last = parts[parts.count - 1].path
        let scaleLogit = try readOutput(spec.outputs.scaleLogit, of: result, path: last)
        let shift = try readOutput(spec.outputs.shift, of: result, path: last)
        return (Self.firstTokens(scaleLogit, count: count), Self.firstTokens(shift, count: count))
    }

    /// Runs the function `pick` chooses in every package, feeding each the previous one's
    /// hidden state (plus the `shared` inputs), and returns the last package's outputs.
    private func runChain(first: [String: MLMultiArray], shared: [String: MLMultiArray],
                          pick: (Part) throws -> MLModel?) throws -> MLFeatureProvider {
        var inputs = first
        var result: MLFeatureProvider?
        for part in parts {
            guard let model = try pick(part) else {
                throw StarFlowError.interfaceMismatch(path: part.path, problem: "the package lacks a function the block needs")
            }
            guard let state = part.state else {
                throw StarFlowError.invalidArgument("call reset(rows:) before running \(part.path)")
            }
            let output = try predict(model, inputs.merging(shared) { current, _ in current }, state: state, path: part.path)
            if let hidden = spec.hidden, let array = output.featureValue(for: hidden.output)?.multiArrayValue {
                inputs = [hidden.input: array]
            }
            result = output
        }
        guard let result else { throw StarFlowError.interfaceMismatch(path: spec.package, problem: "the block has no package") }
        return result
    }

    private static func model(_ steps: [(size: Int, model: MLModel)], size: Int) throws -> MLModel {
        guard let step = steps.first(where: { $0.size == size }) else {
            throw StarFlowError.invalidArgument("no step function for chunks of \(size) tokens")
        }
        return step.model
    }

    /// (rows, n, C) → (rows, size, C) with zero tokens appended.
    private static func padded(_ tokens: Tensor, to size: Int) -> Tensor {
        let rows = tokens.shape[0], count = tokens.shape[1], channels = tokens.shape[2]
        guard size > count else { return tokens }
        var values = [Float](repeating: 0, count: rows * size * channels)
        for row in 0..<rows {
            let width = count * channels
            values[(row * size * channels)..<(row * size * channels + width)] = tokens.values[(row * width)..<((row + 1) * width)]
        }
        return Tensor(shape: [rows, size, channels], values: values)
    }

    /// The first `count` tokens of every row of (rows, size, C).
    private static func firstTokens(_ output: Tensor, count: Int) -> Tensor {
        let rows = output.shape[0], size = output.shape[1], channels = output.shape[2]
        guard size > count else { return output }
        var values: [Float] = []
        for row in 0..<rows {
            values.append(contentsOf: output.values[(row * size * channels)..<(row * size * channels + count * channels)])
        }
        return Tensor(shape: [rows, count, channels], values: values)
    }
}
#endif
