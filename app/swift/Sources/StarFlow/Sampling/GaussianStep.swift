import Foundation

/// The per-token arithmetic of sampling, in Float32 as the official code: each token's Gaussian
/// N(μ, σ²) comes from the block's (scale logit a, shift b), and the noise z becomes x = z·σ + μ.
public enum GaussianStep {
    /// softplus(0 + this) = 1: a zero scale logit means unit scale.
    public static let inverseSoftplusOfOne: Float = 0.541324854612918

    /// σ from the scale logit: softplus(a + ln(e − 1)), or exp(a) for models trained without softplus.
    public static func scale(fromLogit logit: Float, useSoftplus: Bool) -> Float {
        useSoftplus ? softplus(logit + inverseSoftplusOfOne) : exp(logit)
    }

    /// log(1 + eˣ), computed as max(x, 0) + log1p(e^−|x|) so it neither overflows nor loses small x.
    public static func softplus(_ x: Float) -> Float {
        max(x, 0) + log1p(exp(-abs(x)))
    }

    /// The official guidance rule for one element: the Gaussian ∝ p_c^(1+w) / p_u^w, with the
    /// precision ratio clipped so the guided σ never exceeds σ_c.
    public static func guided(muConditional: Float, sigmaConditional: Float, muUnconditional: Float,
                              sigmaUnconditional: Float, weight w: Float) -> (mu: Float, sigma: Float) {
        let ratio = min(sigmaConditional / sigmaUnconditional, 1)
        let s = ratio * ratio
        let denominator = 1 + w - w * s
        let sigma = sigmaConditional / denominator.squareRoot()
        let mu = ((1 + w) * muConditional - (w * s) * muUnconditional) / denominator
        return (mu, sigma)
    }

    /// x = z·σ + μ for a chunk laid out (rows, n, C). With `guidance`, the rows are conditional
    /// then unconditional; the guided x is written to both halves, so the unconditional branch
    /// continues from the guided tokens.
    public static func colour(noise z: [Float], scaleLogit a: [Float], shift b: [Float], rows: Int,
                              guidance: Float?, useSoftplus: Bool) -> [Float] {
        guard let w = guidance else {
            return z.indices.map { z[$0] * scale(fromLogit: a[$0], useSoftplus: useSoftplus) + b[$0] }
        }
        let half = z.count / 2
        var x = [Float](repeating: 0, count: z.count)
        for index in 0..<half {
            let (mu, sigma) = guided(
                muConditional: b[index], sigmaConditional: scale(fromLogit: a[index], useSoftplus: useSoftplus),
                muUnconditional: b[half + index], sigmaUnconditional: scale(fromLogit: a[half + index], useSoftplus: useSoftplus),
                weight: w)
            x[index] = z[index] * sigma + mu
            x[half + index] = z[half + index] * sigma + mu
        }
        return x
    }

    /// The official Jacobi convergence value: mean((new − old)²) / mean(new²) over a whole chunk.
    public static func relativeChange(new: [Float], old: [Float]) -> Float {
        var difference = 0.0, magnitude = 0.0
        for index in new.indices {
            let delta = Double(new[index] - old[index])
            difference += delta * delta
            magnitude += Double(new[index]) * Double(new[index])
        }
        return Float(difference / magnitude)
    }
}
