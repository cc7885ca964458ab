import Foundation
import Testing
@testable import StarFlow

/// The reference backend and the sampler against the official sequential samples
/// (fixtures/starflow/README.md §5, §7): every `seq.k` within max-abs 2e-4 — the README's float32
/// tolerance, below the smallest porting-bug signal (2.3e-4 for tanh-GELU at guidance 0).
struct ReferenceSamplerTests {
    static let tolerance: Float = 2e-4

    @Test(arguments: [("g0", Float(0)), ("g2p5", Float(2.5))])
    func sequentialSamplesMatchEveryBlockOutput(name: String, guidance: Float) throws {
        let flow = try TinyFlow.text()
        let inputs = try Fixtures.safetensors("starflow/inputs.safetensors")
        let expected = try Fixtures.safetensors("starflow/sample.safetensors")
        let condition = try inputs.tensor(guidance > 0 ? "y_cfg" : "y")
        let result = try flow.sample(noise: inputs.tensor("noise"), condition: condition,
                                     configuration: SamplingConfiguration(guidance: guidance))
        try expectSequence(result, matches: expected, prefix: "\(name).seq", tolerance: Self.tolerance)
    }

    @Test(arguments: [("g0", Float(0)), ("g2p5", Float(2.5))])
    func nonSquareSequentialSamplesMatch(name: String, guidance: Float) throws {
        let inputs = try Fixtures.safetensors("starflow/inputs.safetensors")
        let expected = try Fixtures.safetensors("starflow/nonsquare.safetensors")
        let flow = try TinyFlow.text(height: 8, width: 12)
        let result = try flow.sample(noise: inputs.tensor("noise_ns"), condition: inputs.tensor(guidance > 0 ? "y_cfg" : "y"),
                                     configuration: SamplingConfiguration(guidance: guidance))
        try expectSequence(result, matches: expected, prefix: "\(name).seq", tolerance: Self.tolerance)
    }

    @Test(arguments: [("g0", Float(0)), ("g2p5", Float(2.5))])
    func labelModelSamplesMatch(name: String, guidance: Float) throws {
        let expected = try Fixtures.safetensors("starflow/label_model/fixtures.safetensors")
        let flow = try TinyFlow.label()
        let result = try flow.sample(noise: expected.tensor("noise"), condition: expected.tensor(guidance > 0 ? "y_cfg" : "y"),
                                     configuration: SamplingConfiguration(guidance: guidance))
        try expectSequence(result, matches: expected, prefix: "\(name).seq", tolerance: Self.tolerance)
    }
}

/// Checks `[noise, after each block…]` against the fixture's `prefix.0…K`.
func expectSequence(_ result: SampleResult, matches expected: SafeTensorsFile, prefix: String, tolerance: Float,
                    sourceLocation: SourceLocation = #_sourceLocation) throws {
    for (stage, trace) in result.blocks.enumerated() {
        let reference = try expected.tensor("\(prefix).\(stage + 1)")
        let difference = trace.output.maxAbsDifference(reference)
        #expect(difference < tolerance, "\(prefix).\(stage + 1) (block \(trace.block)) differs by \(difference)", sourceLocation: sourceLocation)
    }
    #expect(result.sample == result.blocks.last?.output, sourceLocation: sourceLocation)
}
