import Foundation
import Testing
@testable import StarFlow
@testable import StarFlowReference

/// `generate(noise:)` on the reference backend: a noise file written by Python's `save_noise`
/// (the noise seed 7 draws) samples exactly what `generate(seed: 7)` samples; noise of another
/// shape, non-finite noise and noise from another model are refused with a clear error.
struct NoiseGenerationTests {
    /// A reference block as a generator stage: nothing to load, and no score step (the
    /// generator runs without `noiseStd`, so `forward`/`vjp` are never called).
    final class ReferenceStage: FlowBlock, LikelihoodBlock, ResourceManaging {
        let block: ReferenceFlowBlock
        init(_ block: ReferenceFlowBlock) { self.block = block }
        var sos: [Float] { block.sos }
        var flipped: Bool { block.flipped }
        var hasText: Bool { block.hasText }
        var tokenChannels: Int { block.tokenChannels }
        var tokenCount: Int { block.tokenCount }
        var maxChunkSize: Int { block.maxChunkSize }
        func reset(rows: Int) throws { try block.reset(rows: rows) }
        func prefill(text: Tensor) throws { try block.prefill(text: text) }
        func step(tokens: Tensor, position: Int) throws -> (scaleLogit: Tensor, shift: Tensor) {
            try block.step(tokens: tokens, position: position)
        }
        func forward(tokens: Tensor, text: Tensor?) throws -> Tensor { throw StarFlowError.invalidArgument("no score step here") }
        func vjp(tokens: Tensor, text: Tensor?, cotangent: Tensor) throws -> Tensor { throw StarFlowError.invalidArgument("no score step here") }
        func loadResources() throws {}
        func unloadResources() {}
    }

    /// The official fixture's text states (conditional, then unconditional rows) for any prompt.
    final class FixtureText: ConditionEncoding {
        func loadResources() throws {}
        func unloadResources() {}
        func condition(for prompt: String) throws -> Tensor {
            let text = try Fixtures.safetensors("starflow/inputs.safetensors").tensor("y_cfg")
            return Tensor.concatenatingRows([text.rows(0..<1), text.rows(2..<3)])
        }
    }

    /// Keeps the latent it is given and shows its first three channels as the image.
    final class RecordingDecoder: LatentDecoding, @unchecked Sendable {
        var latents: [Tensor] = []
        func loadResources() throws {}
        func unloadResources() {}
        func decode(_ latent: Tensor) throws -> Tensor {
            latents.append(latent)
            let plane = latent.shape[2] * latent.shape[3]
            return Tensor(shape: [1, 3, latent.shape[2], latent.shape[3]], values: latent.values[0..<3 * plane].map { tanhf($0) })
        }
    }

    func generator(decoder: RecordingDecoder) throws -> StarFlowGenerator {
        let model = try ReferenceFlowModel(contentsOf: Fixtures.model("flow"))
        let blocks: [any StarFlowGenerator.Block] = try model.blocks(height: 8, width: 8).map(ReferenceStage.init)
        return try StarFlowGenerator(latent: ExportManifest.Latent(channels: 4, height: 8, width: 8, patchSize: model.config.patchSize),
                                     blocks: blocks, useSoftplus: model.config.useSoftplus, encoder: FixtureText(),
                                     decoder: decoder, noiseStd: nil, reduceMemory: false)
    }

    let configuration = GenerationConfiguration(seed: 7, sampling: SamplingConfiguration(guidance: 2.5), denoise: false)

    @Test func noiseFromPythonSamplesWhatTheSeedSamples() throws {
        let file = try NoiseFile(contentsOf: Fixtures.noise("seed7.safetensors"))
        #expect(file.imageCount == 1 && file.model == "flow" && file.metadata["format"] == "starflow.noise")
        let noise = try file.image(0)
        #expect(noise == NumPyRandomSource.noise(seed: 7, shape: [1, 4, 8, 8]))
        let decoder = RecordingDecoder()
        let generator = try generator(decoder: decoder)
        let seeded = try generator.generate(prompt: "a cat", configuration: configuration)
        let fromNoise = try generator.generate(prompt: "a cat", noise: noise, configuration: configuration)
        var other = configuration
        other.seed = 8
        _ = try generator.generate(prompt: "a cat", configuration: other)
        #expect(decoder.latents.count == 3)
        #expect(decoder.latents[1] == decoder.latents[0])
        #expect(fromNoise.image == seeded.image)
        #expect(decoder.latents[2].maxAbsDifference(decoder.latents[0]) > 0.1, "another seed must sample another latent")
    }

    @Test func noiseOfAnotherShapeOrNotFiniteIsRefused() throws {
        let generator = try generator(decoder: RecordingDecoder())
        for shape in [[1, 4, 8, 12], [2, 4, 8, 8], [4, 8, 8]] {
            #expect(throws: StarFlowError.self) {
                try generator.generate(prompt: "", noise: Tensor(zeros: shape), configuration: configuration)
            }
        }
        var bad = Tensor(zeros: [1, 4, 8, 8])
        bad.values[5] = .nan
        do {
            _ = try generator.generate(prompt: "", noise: bad, configuration: configuration)
            Issue.record("NaN noise was accepted")
        } catch let error as StarFlowError {
            #expect(error.description.contains("NaN"))
        }
        do {
            _ = try generator.generate(prompt: "", noise: Tensor(zeros: [1, 4, 8, 12]), configuration: configuration)
        } catch let error as StarFlowError {
            #expect(error.description.contains("[1, 4, 8, 8]"))
        }
    }

    @Test func noiseFromAnotherModelIsRefused() throws {
        let file = try NoiseFile(contentsOf: Fixtures.noise("seed7.safetensors"))
        try file.check(model: "flow")
        try file.check(model: nil)
        #expect(throws: StarFlowError.self) { try file.check(model: "starflow-3b") }
        #expect(throws: StarFlowError.self) { try file.image(1) }
    }
}
