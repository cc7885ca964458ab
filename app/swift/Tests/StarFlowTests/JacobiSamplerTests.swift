import Foundation
import Testing
@testable import StarFlow

/// Jacobi sampling against the official run (fixtures/starflow/README.md §5, §7): every `seq.k`
/// within 2e-4, and every chunk of every block must take exactly the official number of
/// iterations (`jacobi_trace.json`; the closest diff/threshold ratio is ≥ 1% away from 1, about
/// 100× the effect of float32 noise). Threshold 1e-3 and at most 32 iterations, as the fixture.
/// The fixture's batch holds two images, and the official rule couples them, so these runs are `coupled`.
struct JacobiSamplerTests {
    static let tolerance: Float = 2e-4

    static func official(blockSize: Int) -> SamplingMethod {
        .jacobi(blockSize: blockSize, threshold: 1e-3, maxIter: 32, coupled: true)
    }

    @Test(arguments: [(4, "g0", Float(0)), (4, "g2p5", Float(2.5)), (16, "g0", Float(0)), (16, "g2p5", Float(2.5))])
    func jacobiSamplesAndIterationCountsMatch(blockSize: Int, name: String, guidance: Float) throws {
        let inputs = try Fixtures.safetensors("starflow/inputs.safetensors")
        let expected = try Fixtures.safetensors("starflow/jacobi.safetensors")
        let result = try TinyFlow.text().sample(
            noise: inputs.tensor("noise"), condition: inputs.tensor(guidance > 0 ? "y_cfg" : "y"),
            configuration: SamplingConfiguration(guidance: guidance, method: Self.official(blockSize: blockSize)))
        try expectSequence(result, matches: expected, prefix: "bs\(blockSize).\(name).seq", tolerance: Self.tolerance)
        #expect(try chunkIterations(result) == officialIterations(run: "bs\(blockSize).\(name)"))
    }

    @Test func nonSquareJacobiMatches() throws {
        let inputs = try Fixtures.safetensors("starflow/inputs.safetensors")
        let expected = try Fixtures.safetensors("starflow/nonsquare.safetensors")
        let result = try TinyFlow.text(height: 8, width: 12).sample(
            noise: inputs.tensor("noise_ns"), condition: inputs.tensor("y_cfg"),
            configuration: SamplingConfiguration(guidance: 2.5, method: Self.official(blockSize: 16)))
        #expect(result.sample.maxAbsDifference(try expected.tensor("jacobi_bs16.g2p5.sample")) < Self.tolerance)
        #expect(try chunkIterations(result) == officialIterations(run: "nonsquare.bs16.g2p5"))
    }

    /// A chunk of n tokens is exact after n passes (each pass fixes one more token), so Jacobi
    /// with threshold 0 and n iterations must reproduce sequential sampling.
    @Test func untilConvergenceJacobiEqualsSequentialSampling() throws {
        let inputs = try Fixtures.safetensors("starflow/inputs.safetensors")
        let expected = try Fixtures.safetensors("starflow/sample.safetensors")
        let result = try TinyFlow.text().sample(
            noise: inputs.tensor("noise"), condition: inputs.tensor("y"),
            configuration: SamplingConfiguration(method: .jacobi(blockSize: 2, threshold: 0, maxIter: 2)))
        #expect(result.sample.maxAbsDifference(try expected.tensor("g0.seq.6")) < Self.tolerance)
    }

    /// Per-image convergence: each image of the two-image batch equals its seed sampled alone,
    /// bit for bit, with and without guidance; the coupled batch's iteration counts differ from
    /// the per-image run's, so the two rules are really distinct on this fixture.
    @Test(arguments: [Float(0), Float(2.5)])
    func perImageJacobiEqualsEachImageSampledAlone(guidance: Float) throws {
        let inputs = try Fixtures.safetensors("starflow/inputs.safetensors")
        let noise = try inputs.tensor("noise"), condition = try inputs.tensor(guidance > 0 ? "y_cfg" : "y")
        let flow = try TinyFlow.text()
        let method = SamplingMethod.jacobi(blockSize: 4, threshold: 1e-3, maxIter: 32)
        let batch = try flow.sample(noise: noise, condition: condition, configuration: SamplingConfiguration(guidance: guidance, method: method))
        let images = noise.shape[0]
        for image in 0..<images {
            let rows = guidance > 0 ? [image, images + image] : [image]
            let alone = try flow.sample(noise: noise.rows(image..<(image + 1)), condition: Tensor.concatenatingRows(rows.map { condition.rows($0..<($0 + 1)) }),
                                        configuration: SamplingConfiguration(guidance: guidance, method: method))
            #expect(batch.sample.rows(image..<(image + 1)) == alone.sample)
        }
        let coupled = try flow.sample(noise: noise, condition: condition, configuration: SamplingConfiguration(guidance: guidance, method: Self.official(blockSize: 4)))
        #expect(chunkIterations(coupled) != chunkIterations(batch) || batch.sample != coupled.sample)
    }

    /// (block, start, size, iterations) of every chunk, in sampling order.
    private func chunkIterations(_ result: SampleResult) -> [[Int]] {
        result.blocks.flatMap { trace in trace.jacobiChunks.map { [trace.block, $0.start, $0.size, $0.iterations] } }
    }

    private func officialIterations(run: String) throws -> [[Int]] {
        let trace = try Fixtures.json("starflow/jacobi_trace.json")
        let runs = try #require(trace["runs"] as? [String: Any])
        let chunks = try #require(runs[run] as? [[String: Any]])
        return try chunks.map { chunk in
            try ["block", "start", "chunk", "iterations"].map { try #require(chunk[$0] as? Int) }
        }
    }
}
