import Foundation
import Testing
@testable import StarFlow

/// The score step's driver over per-block forward/vjp functions, on blocks whose Jacobian is
/// known in closed form: z_t = (x_t − 0.5)/σ_t with σ_t depending on the token's position in the
/// block's own order, so a flip applied on the wrong side, a reversed block order or a dropped
/// cotangent all change the result.
struct BlockScoreStepTests {
    /// An elementwise affine block; `sigma(t)` for the token at block-order position t.
    final class AffineBlock: LikelihoodBlock {
        let flipped: Bool
        let hasText: Bool
        let slope: Float
        private(set) var texts: [Tensor?] = []

        init(flipped: Bool, hasText: Bool = false, slope: Float) {
            self.flipped = flipped
            self.hasText = hasText
            self.slope = slope
        }

        func sigma(_ token: Int) -> Float { 1 + slope * Float(token) }

        func forward(tokens: Tensor, text: Tensor?) throws -> Tensor {
            texts.append(text)
            return map(tokens) { value, token in (value - 0.5) / self.sigma(token) }
        }

        func vjp(tokens: Tensor, text: Tensor?, cotangent: Tensor) throws -> Tensor {
            map(cotangent) { value, token in value / self.sigma(token) }
        }

        private func map(_ tensor: Tensor, _ body: (Float, Int) -> Float) -> Tensor {
            let channels = tensor.shape[2]
            return Tensor(shape: tensor.shape, values: tensor.values.enumerated().map { body($0.element, $0.offset / channels) })
        }
    }

    @Test func gradientMatchesTheClosedForm() throws {
        let blocks = [AffineBlock(flipped: true, slope: 0.1), AffineBlock(flipped: false, slope: 0.3),
                      AffineBlock(flipped: true, hasText: true, slope: 0.05)]
        let (channels, height, width, patch) = (2, 4, 2, 2)
        let latent = Tensor(shape: [1, channels, height, width], values: (0..<16).map { Float($0) / 8 - 1 })
        let condition = Tensor(shape: [1, 3, 5], values: [Float](repeating: 1, count: 15))
        let step = BlockScoreStep(blocks: blocks, patchSize: patch, noiseStd: 0.3)
        let denoised = try step.denoised(latent: latent, condition: condition)

        let layout = try TokenLayout(channels: channels, height: height, width: width, patchSize: patch)
        let count = layout.tokenCount, width_ = layout.tokenChannels
        var z = layout.tokens(from: latent).map(Double.init)
        var scale = [Double](repeating: 1, count: z.count)
        for block in blocks {
            for index in z.indices {
                let raster = index / width_
                let token = block.flipped ? count - 1 - raster : raster
                let sigma = Double(block.sigma(token))
                z[index] = (z[index] - 0.5) / sigma
                scale[index] /= sigma
            }
        }
        let gradient = layout.latent(from: z.indices.map { Float(scale[$0] * z[$0]) }, batch: 1)
        let expected = zip(latent.values, gradient.values).map { $0 - 0.09 * $1 }
        #expect(denoised.shape == latent.shape)
        #expect(zip(denoised.values, expected).allSatisfy { abs($0 - $1) < 1e-5 })
        #expect(blocks[2].texts == [condition] && blocks[0].texts == [nil])
    }

    @Test func moreThanOneImageIsRefused() {
        let step = BlockScoreStep(blocks: [AffineBlock(flipped: false, slope: 0)], patchSize: 1, noiseStd: 0.3)
        #expect(throws: StarFlowError.self) { try step.denoised(latent: Tensor(zeros: [2, 1, 2, 2]), condition: nil) }
    }
}
