/// One flow block in the likelihood direction over one whole image, as the score step drives
/// it; a Core ML export provides it through each block package's `forward` and `vjp` functions.
public protocol LikelihoodBlock: AnyObject {
    /// Whether the block reads its tokens in reversed raster order.
    var flipped: Bool { get }
    /// Whether the block reads the condition as a prefix.
    var hasText: Bool { get }

    /// z (1, N, C·p²) for one image's tokens in the block's order, under the conditional `text` (1, T, D) for the deep block.
    func forward(tokens: Tensor, text: Tensor?) throws -> Tensor
    /// The cotangent of `tokens` for the cotangent of z, including the gradient of the block's own Σ log σ.
    func vjp(tokens: Tensor, text: Tensor?, cotangent: Tensor) throws -> Tensor
}

/// The score step x − σ²·∇ₓ[D·nll(x)] by reverse-mode differentiation through the blocks
/// (official `self_denoise`): every block forward in order, keeping its input, then each vjp
/// in reverse, starting from ∂(½Σz²)/∂z = z; D·nll's other term, each block's Σ log σ, is in the
/// vjps. The weights are the blocks' own, so the score step costs no extra memory.
public struct BlockScoreStep: ScoreFunction {
    /// Blocks in forward order (the deep block last).
    public let blocks: [any LikelihoodBlock]
    public let patchSize: Int
    /// σ of the training noise (the manifest's `noise_std`).
    public let noiseStd: Float
    /// Called with a block's index after each of its forward and vjp calls (reduce-memory mode unloads it there).
    public let release: ((Int) -> Void)?

    public init(blocks: [any LikelihoodBlock], patchSize: Int, noiseStd: Float, release: ((Int) -> Void)? = nil) {
        self.blocks = blocks
        self.patchSize = patchSize
        self.noiseStd = noiseStd
        self.release = release
    }

    public func denoised(latent: Tensor, condition: Tensor?) throws -> Tensor {
        guard latent.shape.count == 4, latent.shape[0] == 1 else {
            throw StarFlowError.invalidArgument("the score step runs one image (1, C, H, W) at a time, got shape \(latent.shape)")
        }
        let layout = try TokenLayout(channels: latent.shape[1], height: latent.shape[2], width: latent.shape[3], patchSize: patchSize)
        let shape = [1, layout.tokenCount, layout.tokenChannels]
        var tokens = layout.tokens(from: latent)
        var inputs: [Tensor] = []
        for (index, block) in blocks.enumerated() {
            let x = Tensor(shape: shape, values: layout.ordered(tokens, rows: 1, flipped: block.flipped))
            inputs.append(x)
            let z = try block.forward(tokens: x, text: block.hasText ? condition : nil)
            release?(index)
            try Self.check(z, shape: shape, what: "forward")
            tokens = layout.ordered(z.values, rows: 1, flipped: block.flipped)
        }
        var cotangent = tokens
        for (index, (block, x)) in zip(blocks, inputs).enumerated().reversed() {
            let incoming = Tensor(shape: shape, values: layout.ordered(cotangent, rows: 1, flipped: block.flipped))
            let outgoing = try block.vjp(tokens: x, text: block.hasText ? condition : nil, cotangent: incoming)
            release?(index)
            try Self.check(outgoing, shape: shape, what: "vjp")
            cotangent = layout.ordered(outgoing.values, rows: 1, flipped: block.flipped)
        }
        let gradient = layout.latent(from: cotangent, batch: 1)
        let variance = noiseStd * noiseStd
        return Tensor(shape: latent.shape, values: zip(latent.values, gradient.values).map { $0 - variance * $1 })
    }

    private static func check(_ tensor: Tensor, shape: [Int], what: String) throws {
        guard tensor.shape == shape else {
            throw StarFlowError.invalidArgument("a block's score-step \(what) returned shape \(tensor.shape), expected \(shape)")
        }
    }
}
