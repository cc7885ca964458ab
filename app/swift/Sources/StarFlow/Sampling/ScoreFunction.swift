/// The denoising score step of an exported model: x + σ²·∇ₓ log p(x | condition), which removes
/// the Gaussian noise the flow was trained with. `BlockScoreStep` implements it through the flow
/// blocks' own `forward` and `vjp` functions.
public protocol ScoreFunction {
    /// The denoised latent for `latent` (B, C, H, W) under the conditional rows `condition`.
    func denoised(latent: Tensor, condition: Tensor?) throws -> Tensor
}
