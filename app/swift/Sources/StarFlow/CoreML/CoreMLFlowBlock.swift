#if canImport(CoreML)
import CoreML
import Foundation

/// A flow block exported as stateful Core ML: one function per chunk size (and a prefill
/// function for the deep block) sharing the weights and the KV cache state of their package,
/// plus the score step's `forward` and `vjp`. A block split by layers into several packages runs
/// them in order, each with its own state, passing the hidden state on. `reset` makes fresh
/// states; a chunk smaller than the smallest fitting function is padded with zeros, whose keys
/// land in cache slots no real query reads, and the padded outputs are dropped.
///
/// The sampling functions and the score-step functions are two managed resources: each loads
/// on first use, and `unloadResources` drops both (and the states).
public final class CoreMLFlowBlock: FlowBlock, LikelihoodBlock, ResourceManaging {
    /// The sampling functions of one package: step models by chunk size, the prefill model, and
    /// in cache-IO mode the caches they take (input → updated output name).
    struct SamplingPart {
        let path: String
        let steps: [(size: Int, model: MLModel)]
        let prefill: MLModel?
        let caches: [String: String]
    }

    /// The loaded sampling functions and how they keep the cache.
    struct Sampling {
        let mode: StateMode
        let parts: [SamplingPart]
    }

    /// The score-step functions of one package.
    struct ScoringPart {
        let path: String
        let forward: MLModel
        let vjp: MLModel
    }

    public let spec: ExportManifest.Block
    public var sos: [Float] { spec.sos }
    public var flipped: Bool { spec.flipped }
    public var hasText: Bool { spec.hasText }
    public var tokenChannels: Int { spec.tokenChannels }
    public var tokenCount: Int { spec.tokens }
    public var maxChunkSize: Int { spec.stepFunctions.last?.size ?? 0 }

    private let manifest: ExportManifest
    private let tables: StepTables?
    private let sampling: ManagedResource<Sampling>
    private let scoring: ManagedResource<[ScoringPart]>
    /// Per package: its Core ML state (shared mode) or its caches (cache-IO mode), made by `reset`.
    private var states: [MLState] = []
    private var caches: [[String: MLMultiArray]] = []

    /// How the block keeps its cache on this device (loads the block to find out).
    public func stateMode() throws -> StateMode { try sampling.perform { $0.mode } }

    /// `tables`: the block's RoPE table when its steps take their RoPE rows and mask as inputs (`--step-tables`).
    init(packages: [CoreMLPackage], spec: ExportManifest.Block, manifest: ExportManifest, computeUnits: ComputeUnits, tables: StepTables?) {
        self.spec = spec
        self.manifest = manifest
        self.tables = tables
        sampling = ManagedResource(name: "\(spec.package) sampling") {
            let shared = try Self.samplingParts(packages, spec: spec, manifest: manifest, computeUnits: computeUnits, cacheIO: false)
            let mode = try StateMode.select(for: spec) { try Self.probeSharedState(shared[0]) }
            guard mode == .cacheIO else { return Sampling(mode: .shared, parts: shared) }
            return Sampling(mode: .cacheIO, parts: try Self.samplingParts(packages, spec: spec, manifest: manifest, computeUnits: computeUnits, cacheIO: true))
        }
        scoring = ManagedResource(name: "\(spec.package) score step") {
            guard let forward = spec.functions.forward, let vjp = spec.functions.vjp else {
                throw StarFlowError.invalidFile(path: ExportManifest.fileName, problem: "\(spec.package) has no score-step functions; export with the score step")
            }
            return try packages.enumerated().map { part, package in
                guard let forwardInterface = manifest.forwardInterface(of: spec, part: part),
                      let vjpInterface = manifest.vjpInterface(of: spec, part: part) else {
                    throw StarFlowError.invalidFile(path: ExportManifest.fileName, problem: "the manifest has no score_step entry")
                }
                return ScoringPart(path: package.url.path,
                                   forward: try package.load(function: forward, computeUnits: computeUnits, expecting: forwardInterface),
                                   vjp: try package.load(function: vjp, computeUnits: computeUnits, expecting: vjpInterface))
            }
        }
    }

    public func loadResources() throws { try sampling.loadResources() }

    public func unloadResources() {
        states = []
        caches = []
        sampling.unloadResources()
        scoring.unloadResources()
    }

    /// Every package's sampling functions, the stateful ones or their cache-IO twins, each checked against the manifest.
    private static func samplingParts(_ packages: [CoreMLPackage], spec: ExportManifest.Block, manifest: ExportManifest,
                                      computeUnits: ComputeUnits, cacheIO: Bool) throws -> [SamplingPart] {
        let stepNames = Dictionary(uniqueKeysWithValues: (cacheIO ? spec.cacheIOStepFunctions : spec.stepFunctions).map { ($0.size, $0.name) })
        let prefillName = cacheIO ? spec.cacheIO?.functions.prefill : spec.functions.prefill
        return try packages.enumerated().map { part, package in
            func expect(_ base: ModelInterface) -> ModelInterface {
                cacheIO ? manifest.cacheIOInterface(of: spec, base: base, part: part) : base
            }
            let steps = try spec.stepFunctions.map { size, _ in
                guard let name = stepNames[size] else {
                    throw StarFlowError.invalidFile(path: ExportManifest.fileName, problem: "\(spec.package) has no cache-IO twin for step \(size)")
                }
                return (size, try package.load(function: name, computeUnits: computeUnits,
                                               expecting: expect(manifest.stepInterface(of: spec, chunk: size, part: part))))
            }
            var prefill: MLModel?
            if let name = prefillName, let expected = manifest.prefillInterface(of: spec, part: part) {
                prefill = try package.load(function: name, computeUnits: computeUnits, expecting: expect(expected))
            }
            return SamplingPart(path: package.url.path, steps: steps, prefill: prefill, caches: cacheIO ? spec.caches(part: part) : [:])
        }
    }

    /// One call of a second function (prefill, or the largest step) on zeros with a state the
    /// first step function made: throws where the device refuses a shared state.
    private static func probeSharedState(_ part: SamplingPart) throws {
        guard let owner = part.steps.first?.model, let other = part.prefill ?? part.steps.last?.model, other !== owner else { return }
        let state = owner.makeState()
        var inputs: [String: MLMultiArray] = [:]
        for (name, feature) in other.modelDescription.inputDescriptionsByName {
            guard let constraint = feature.multiArrayConstraint else { continue }
            inputs[name] = try MLMultiArray.zeros(shape: constraint.shape.map(\.intValue), dataType: constraint.dataType)
        }
        _ = try predict(other, inputs, state: state, path: part.path)
    }

    public func reset(rows: Int) throws {
        guard rows == spec.rows else {
            throw StarFlowError.invalidArgument("\(spec.package) was exported for \(spec.rows) rows, not \(rows)")
        }
        try sampling.perform { sampling in
            states = []
            caches = []
            for part in sampling.parts {
                guard let first = part.steps.first?.model else {
                    throw StarFlowError.interfaceMismatch(path: part.path, problem: "the package has no step function")
                }
                switch sampling.mode {
                case .shared:
                    states.append(first.makeState())
                case .cacheIO:
                    var zeros: [String: MLMultiArray] = [:]
                    for name in part.caches.keys {
                        guard let constraint = first.modelDescription.inputDescriptionsByName[name]?.multiArrayConstraint else {
                            throw StarFlowError.interfaceMismatch(path: part.path, problem: "the cache-IO step lacks the input \(name)")
                        }
                        zeros[name] = try MLMultiArray.zeros(shape: constraint.shape.map(\.intValue), dataType: constraint.dataType)
                    }
                    caches.append(zeros)
                }
            }
        }
    }

    public func prefill(text: Tensor) throws {
        guard let input = spec.inputs.text else {
            throw StarFlowError.invalidArgument("\(spec.package) has no prefill function; only the deep block reads the condition")
        }
        try sampling.perform { sampling in
            let parts = sampling.parts
            guard let model = parts.first?.prefill else {
                throw StarFlowError.invalidArgument("\(spec.package) has no prefill function; only the deep block reads the condition")
            }
            let array = try MLMultiArray.make(text, dataType: CoreMLPackage.dataType(of: model, input: input))
            _ = try runChain(parts, first: [input: array], shared: [:]) { $0.prefill }
        }
    }

    public func step(tokens: Tensor, position: Int) throws -> (scaleLogit: Tensor, shift: Tensor) {
        let count = tokens.shape[1]
        guard let size = spec.stepFunctions.map(\.size).first(where: { $0 >= count }) else {
            throw StarFlowError.invalidArgument("\(spec.package) has no step function for \(count) tokens (largest \(maxChunkSize))")
        }
        return try sampling.perform { sampling in
            let parts = sampling.parts
            guard let firstSteps = parts.first?.steps else {
                throw StarFlowError.interfaceMismatch(path: spec.package, problem: "the block has no package")
            }
            let model = try Self.model(firstSteps, size: size)
            let padded = Self.padded(tokens, to: size)
            let inputs = [spec.inputs.tokens: try MLMultiArray.make(padded, dataType: CoreMLPackage.dataType(of: model, input: spec.inputs.tokens))]
            var shared = [spec.inputs.position: try MLMultiArray.make(int32: [Int32(position)], shape: [1])]
            if let tables, let names = spec.stepTables?.inputs {
                let rows = try tables.inputs(position: position, count: size)
                for (name, tensor) in [(names.ropeCos, rows.cos), (names.ropeSin, rows.sin), (names.mask, rows.mask)] {
                    shared[name] = try MLMultiArray.make(tensor, dataType: CoreMLPackage.dataType(of: model, input: name))
                }
            }
            let result = try runChain(parts, first: inputs, shared: shared) { try Self.model($0.steps, size: size) }
            let last = parts[parts.count - 1].path
            let scaleLogit = try readOutput(spec.outputs.scaleLogit, of: result, path: last)
            let shift = try readOutput(spec.outputs.shift, of: result, path: last)
            return (Self.firstTokens(scaleLogit, count: count), Self.firstTokens(shift, count: count))
        }
    }

    // MARK: score step

    public func forward(tokens: Tensor, text: Tensor?) throws -> Tensor {
        let score = try scoreNames()
        return try scoring.perform { parts in
            let inputs = try partInputs(parts, tokens: tokens, text: text, score: score)
            let last = parts[parts.count - 1]
            return try readOutput(score.outputs.z, of: predict(last.forward, inputs[inputs.count - 1], state: nil, path: last.path), path: last.path)
        }
    }

    public func vjp(tokens: Tensor, text: Tensor?, cotangent: Tensor) throws -> Tensor {
        let score = try scoreNames()
        return try scoring.perform { parts in
            let inputs = try partInputs(parts, tokens: tokens, text: text, score: score)
            let last = parts[parts.count - 1]
            var incoming = try MLMultiArray.make(cotangent, dataType: CoreMLPackage.dataType(of: last.vjp, input: score.inputs.cotangent))
            var total = [Float](repeating: 0, count: tokens.count)
            for index in parts.indices.reversed() {
                let part = parts[index]
                let result = try predict(part.vjp, inputs[index].merging([score.inputs.cotangent: incoming]) { _, new in new }, state: nil, path: part.path)
                if index == 0 || index == parts.count - 1 {
                    let gradient = try readOutput(score.outputs.tokensCotangent, of: result, path: part.path)
                    for position in total.indices { total[position] += gradient.values[position] }
                }
                if index > 0 { incoming = try readArray(score.outputs.hiddenCotangent, of: result, path: part.path) }
            }
            return Tensor(shape: tokens.shape, values: total)
        }
    }

    private func scoreNames() throws -> ExportManifest.ScoreStep {
        guard let score = manifest.scoreStep else {
            throw StarFlowError.invalidFile(path: ExportManifest.fileName, problem: "the export has no score step (it was made with --no-score-step)")
        }
        return score
    }

    /// The inputs of every package's score functions for one image: tokens and text for the
    /// first, each later package the previous one's `next_hidden` (run forward here), and the
    /// tokens again for the last.
    private func partInputs(_ parts: [ScoringPart], tokens: Tensor, text: Tensor?, score: ExportManifest.ScoreStep) throws -> [[String: MLMultiArray]] {
        guard let first = parts.first else { throw StarFlowError.interfaceMismatch(path: spec.package, problem: "the block has no package") }
        let tokenArray = try MLMultiArray.make(tokens, dataType: CoreMLPackage.dataType(of: first.forward, input: score.inputs.tokens))
        var firstInputs = [score.inputs.tokens: tokenArray]
        if spec.hasText {
            guard let name = score.inputs.text, let text else {
                throw StarFlowError.invalidArgument("\(spec.package) needs the conditional text states for the score step")
            }
            firstInputs[name] = try MLMultiArray.make(text, dataType: CoreMLPackage.dataType(of: first.forward, input: name))
        }
        var inputs = [firstInputs]
        for index in parts.indices.dropFirst() {
            let previous = parts[index - 1]
            let output = try predict(previous.forward, inputs[index - 1], state: nil, path: previous.path)
            var next = [score.inputs.hidden: try readArray(score.outputs.nextHidden, of: output, path: previous.path)]
            if index == parts.count - 1 { next[score.inputs.tokens] = tokenArray }
            inputs.append(next)
        }
        return inputs
    }

    // MARK: helpers

    /// Runs the function `pick` chooses in every package, feeding each the previous one's
    /// hidden state (plus the `shared` inputs) and its cache (state, or cache-IO arrays that come
    /// back updated), and returns the last package's outputs.
    private func runChain(_ parts: [SamplingPart], first: [String: MLMultiArray], shared: [String: MLMultiArray],
                          pick: (SamplingPart) throws -> MLModel?) throws -> MLFeatureProvider {
        guard states.count == parts.count || caches.count == parts.count else {
            throw StarFlowError.invalidArgument("call reset(rows:) before running \(spec.package)")
        }
        var inputs = first
        var result: MLFeatureProvider?
        for (index, part) in parts.enumerated() {
            guard let model = try pick(part) else {
                throw StarFlowError.interfaceMismatch(path: part.path, problem: "the package lacks a function the block needs")
            }
            var all = inputs.merging(shared) { current, _ in current }
            if index < caches.count { all.merge(caches[index]) { current, _ in current } }
            let output = try predict(model, all, state: index < states.count ? states[index] : nil, path: part.path)
            if index < caches.count {
                for (input, updated) in part.caches { caches[index][input] = try readArray(updated, of: output, path: part.path) }
            }
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
