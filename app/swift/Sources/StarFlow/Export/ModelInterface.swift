/// The inputs and outputs a Core ML function declares, by name and shape, so that what a
/// package really takes can be compared with what the manifest promises — on Linux too, where
/// the packages cannot be loaded. A nil dimension matches any size; an empty declared shape
/// (an output whose shape Core ML leaves open) matches any shape.
public struct ModelInterface: Equatable, Sendable {
    public var inputs: [String: [Int?]]
    public var outputs: [String: [Int?]]

    public init(inputs: [String: [Int?]], outputs: [String: [Int?]]) {
        self.inputs = inputs
        self.outputs = outputs
    }

    /// Throws naming the file and function when `self` (what a package declares) differs from
    /// `expected`: a missing or extra input, a missing output, or another shape.
    public func check(against expected: ModelInterface, path: String, function: String) throws {
        let missing = expected.inputs.keys.filter { inputs[$0] == nil }.sorted()
        let extra = inputs.keys.filter { expected.inputs[$0] == nil }.sorted()
        guard missing.isEmpty, extra.isEmpty else {
            throw StarFlowError.interfaceMismatch(path: path, problem: "function \(function) takes inputs \(inputs.keys.sorted()), the manifest promises \(expected.inputs.keys.sorted())")
        }
        let missingOutputs = expected.outputs.keys.filter { outputs[$0] == nil }.sorted()
        guard missingOutputs.isEmpty else {
            throw StarFlowError.interfaceMismatch(path: path, problem: "function \(function) lacks outputs \(missingOutputs)")
        }
        for (name, shape) in expected.inputs.sorted(by: { $0.key < $1.key }) {
            try Self.compare(inputs[name] ?? [], shape, name: "input \(name)", path: path, function: function)
        }
        for (name, shape) in expected.outputs.sorted(by: { $0.key < $1.key }) {
            try Self.compare(outputs[name] ?? [], shape, name: "output \(name)", path: path, function: function)
        }
    }

    private static func compare(_ declared: [Int?], _ expected: [Int?], name: String, path: String, function: String) throws {
        guard !declared.isEmpty else { return }
        let matches = declared.count == expected.count && zip(declared, expected).allSatisfy { actual, wanted in
            actual == nil || wanted == nil || actual == wanted
        }
        guard matches else {
            throw StarFlowError.interfaceMismatch(path: path, problem: "function \(function) \(name) has shape \(describe(declared)), the manifest implies \(describe(expected))")
        }
    }

    private static func describe(_ shape: [Int?]) -> String {
        "[" + shape.map { $0.map(String.init) ?? "?" }.joined(separator: ", ") + "]"
    }
}

/// What each exported function must declare, derived from the manifest alone. A block or text
/// encoder split into several packages passes a hidden state from one package to the next:
/// the first takes the block's (or encoder's) input, the last gives its outputs.
extension ExportManifest {
    /// Step function `chunk` of package `part` of `block`: tokens, or the hidden state of the
    /// previous package, at `position` → (scale logit, shift), or the hidden state for the next.
    public func stepInterface(of block: Block, chunk: Int, part: Int = 0) -> ModelInterface {
        let tokens: [Int?] = [block.rows, chunk, block.tokenChannels]
        let hidden: [Int?] = [block.rows, chunk, nil]
        let input = part == 0 ? (block.inputs.tokens, tokens) : (block.hidden?.input ?? "", hidden)
        let outputs = part == block.packageChain.count - 1
            ? [block.outputs.scaleLogit: tokens, block.outputs.shift: tokens]
            : [block.hidden?.output ?? "": hidden]
        var inputs: [String: [Int?]] = [input.0: input.1, block.inputs.position: [1]]
        if let tables = block.stepTables {
            inputs[tables.inputs.ropeCos] = [chunk, tables.headDim]
            inputs[tables.inputs.ropeSin] = [chunk, tables.headDim]
            inputs[tables.inputs.mask] = [chunk, block.cacheLength]
        }
        return ModelInterface(inputs: inputs, outputs: outputs)
    }

    /// The prefill function of package `part` of the deep block: the condition states, or the
    /// hidden state of the previous package, for cache positions 0..<T.
    public func prefillInterface(of block: Block, part: Int = 0) -> ModelInterface? {
        guard let text = block.inputs.text, let condition else { return nil }
        let input: (String, [Int?]) = part == 0
            ? (text, [block.rows, block.textLength, condition.dim])
            : (block.hidden?.input ?? "", [block.rows, block.textLength, nil])
        return ModelInterface(inputs: [input.0: input.1], outputs: [:])
    }

    /// Package `part` of the text encoder: token ids (or the previous package's hidden state)
    /// and the mask → text states (or the hidden state for the next package).
    public func textEncoderInterface(part: Int = 0) -> ModelInterface? {
        guard let encoder = textEncoder, let condition else { return nil }
        let length = condition.length
        let hidden: [Int?] = [nil, length, nil]
        let input: (String, [Int?]) = part == 0 ? (encoder.inputs.inputIds, [nil, length]) : (encoder.hidden?.input ?? "", hidden)
        let output: (String, [Int?]) = part == encoder.packageChain.count - 1
            ? (encoder.output, [nil, length, condition.dim])
            : (encoder.hidden?.output ?? "", hidden)
        return ModelInterface(inputs: [input.0: input.1, encoder.inputs.attentionMask: [nil, length]], outputs: [output.0: output.1])
    }

    /// A cache-IO twin of a sampling function: `base` plus every KV cache of package `part` as an
    /// input (rows, …) and its updated copy as an output.
    public func cacheIOInterface(of block: Block, base: ModelInterface, part: Int = 0) -> ModelInterface {
        var interface = base
        for (input, output) in block.caches(part: part) {
            interface.inputs[input] = [block.rows, nil, nil, nil]
            interface.outputs[output] = [block.rows, nil, nil, nil]
        }
        return interface
    }

    /// The score step's `forward` of package `part` of `block`, one image: tokens in the block's
    /// order (first and last package), the conditional text (first package of the deep block),
    /// the previous package's hidden state (all but the first) → `z`, or the next hidden state.
    public func forwardInterface(of block: Block, part: Int = 0) -> ModelInterface? {
        guard let score = scoreStep else { return nil }
        let (first, last) = (part == 0, part == block.packageChain.count - 1)
        let tokens: [Int?] = [1, block.tokens, block.tokenChannels]
        let hidden: [Int?] = [1, block.textLength + block.tokens, nil]
        var inputs: [String: [Int?]] = [:]
        if first || last { inputs[score.inputs.tokens] = tokens }
        if first, block.hasText, let text = score.inputs.text, let condition { inputs[text] = [1, condition.length, condition.dim] }
        if !first { inputs[score.inputs.hidden] = hidden }
        return ModelInterface(inputs: inputs, outputs: last ? [score.outputs.z: tokens] : [score.outputs.nextHidden: hidden])
    }

    /// The score step's `vjp` of package `part`: the forward's inputs and the cotangent of its
    /// output → the cotangent of its tokens (first and last package) and of its hidden input.
    public func vjpInterface(of block: Block, part: Int = 0) -> ModelInterface? {
        guard let score = scoreStep, let forward = forwardInterface(of: block, part: part) else { return nil }
        var inputs = forward.inputs
        inputs[score.inputs.cotangent] = forward.outputs.values.first
        var outputs: [String: [Int?]] = [:]
        if let tokens = forward.inputs[score.inputs.tokens] { outputs[score.outputs.tokensCotangent] = tokens }
        if let hidden = forward.inputs[score.inputs.hidden] { outputs[score.outputs.hiddenCotangent] = hidden }
        return ModelInterface(inputs: inputs, outputs: outputs)
    }

    /// The VAE decoder: the flow latent divided by the scaling factor → the image.
    public func decoderInterface(input: String, output: String) -> ModelInterface {
        ModelInterface(inputs: [input: [1, latent.channels, latent.height, latent.width]],
                       outputs: [output: [1, image.channels, image.height, image.width]])
    }
}
