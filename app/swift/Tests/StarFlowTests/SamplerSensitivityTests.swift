import Foundation
import Testing
@testable import StarFlow
@testable import StarFlowReference

/// The fixture comparisons above must be able to fail: each porting bug below, simulated from
/// outside the sampler, moves the sample far past the 2e-4 tolerance (the README's sensitivity
/// table lists 5.22 for swapped CFG halves, 0.22 for weight 2.4 instead of 2.5, 2.59 for
/// swapped token orders).
struct SamplerSensitivityTests {
    static let clearlyWrong: Float = 1e-2

    @Test func swappedGuidanceHalvesAreCaught() throws {
        let inputs = try Fixtures.safetensors("starflow/inputs.safetensors")
        let expected = try Fixtures.safetensors("starflow/sample.safetensors").tensor("g2p5.seq.6")
        let condition = try inputs.tensor("y_cfg")
        let swapped = Tensor.concatenatingRows([condition.rows(2..<4), condition.rows(0..<2)])
        let result = try TinyFlow.text().sample(noise: inputs.tensor("noise"), condition: swapped,
                                                configuration: SamplingConfiguration(guidance: 2.5))
        #expect(result.sample.maxAbsDifference(expected) > Self.clearlyWrong)
    }

    @Test func wrongGuidanceWeightIsCaught() throws {
        let inputs = try Fixtures.safetensors("starflow/inputs.safetensors")
        let expected = try Fixtures.safetensors("starflow/sample.safetensors").tensor("g2p5.seq.6")
        let result = try TinyFlow.text().sample(noise: inputs.tensor("noise"), condition: inputs.tensor("y_cfg"),
                                                configuration: SamplingConfiguration(guidance: 2.4))
        #expect(result.sample.maxAbsDifference(expected) > Self.clearlyWrong)
    }

    @Test func swappedTokenOrdersAreCaught() throws {
        let inputs = try Fixtures.safetensors("starflow/inputs.safetensors")
        let expected = try Fixtures.safetensors("starflow/sample.safetensors").tensor("g0.seq.6")
        let model = try ReferenceFlowModel(contentsOf: Fixtures.model("flow"))
        let blocks: [any FlowBlock] = try model.blocks(height: 8, width: 8).map(OppositeOrderBlock.init)
        let sampler = try FlowSampler(blocks: blocks, patchSize: 1)
        let result = try sampler.sample(noise: inputs.tensor("noise"), condition: inputs.tensor("y"))
        #expect(result.sample.maxAbsDifference(expected) > Self.clearlyWrong)
    }

    /// Hand-derived from the README's rule s = min(σc/σu, 1)², d = 1 + w − w·s, σ = σc/√d,
    /// μ = ((1+w)·μc − w·s·μu)/d: guidance pushes the mean away from the unconditional one.
    @Test func guidedGaussianFollowsTheOfficialRule() {
        let equal = GaussianStep.guided(muConditional: 1, sigmaConditional: 1, muUnconditional: 0, sigmaUnconditional: 1, weight: 2.5)
        #expect(equal.mu == 3.5 && equal.sigma == 1)
        let sharper = GaussianStep.guided(muConditional: 1, sigmaConditional: 0.5, muUnconditional: 0, sigmaUnconditional: 1, weight: 2.5)
        #expect(abs(sharper.mu - 3.5 / 2.875) < 1e-6)
        #expect(abs(sharper.sigma - 0.5 / Float(2.875).squareRoot()) < 1e-6)
        let wider = GaussianStep.guided(muConditional: 1, sigmaConditional: 2, muUnconditional: 3, sigmaUnconditional: 1, weight: 2.5)
        #expect(wider.mu == 3.5 - 7.5 && wider.sigma == 2)
    }

    @Test func unitScaleAtZeroLogit() {
        #expect(abs(GaussianStep.scale(fromLogit: 0, useSoftplus: true) - 1) < 1e-6)
        #expect(GaussianStep.scale(fromLogit: 0, useSoftplus: false) == 1)
    }
}

/// A block that reads its tokens in the opposite order: the "wrong permutation" porting bug.
final class OppositeOrderBlock: FlowBlock {
    let inner: any FlowBlock
    init(_ inner: any FlowBlock) { self.inner = inner }

    var sos: [Float] { inner.sos }
    var flipped: Bool { !inner.flipped }
    var hasText: Bool { inner.hasText }
    var tokenChannels: Int { inner.tokenChannels }
    var tokenCount: Int { inner.tokenCount }
    var maxChunkSize: Int { inner.maxChunkSize }
    func reset(rows: Int) throws { try inner.reset(rows: rows) }
    func prefill(text: Tensor) throws { try inner.prefill(text: text) }
    func step(tokens: Tensor, position: Int) throws -> (scaleLogit: Tensor, shift: Tensor) {
        try inner.step(tokens: tokens, position: position)
    }
}
