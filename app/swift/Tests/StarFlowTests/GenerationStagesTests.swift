import Foundation
import Testing
@testable import StarFlow

/// The generation's stage order and memory policy, on fake stages that log their loads: the
/// reduce-memory order (text encoder → encode → unload → each block → decoder), lazy loading
/// that keeps everything without it, the deep-block preview, and the async entry point.
struct GenerationStagesTests {
    final class Log: @unchecked Sendable {
        private let lock = NSLock()
        private var entries: [String] = []
        var events: [String] { lock.withLock { entries } }
        func add(_ event: String) { lock.withLock { entries.append(event) } }
    }

    /// Predicts N(0, 1) for every token (so sampling returns the noise); z = x forward, and the
    /// vjp passes the cotangent through. Loads on first use, as the Core ML blocks do.
    final class FakeBlock: FlowBlock, LikelihoodBlock, ResourceManaging {
        let flipped: Bool
        let hasText: Bool
        let tokenChannels = 2
        let tokenCount = 6
        let maxChunkSize = Int.max
        let sos: [Float] = [0, 0]
        private let resource: ManagedResource<Int>

        init(index: Int, hasText: Bool, log: Log) {
            flipped = index % 2 == 0
            self.hasText = hasText
            resource = ManagedResource(name: "block\(index)", onEvent: log.add) { index }
        }

        func loadResources() throws { try resource.loadResources() }
        func unloadResources() { resource.unloadResources() }
        func reset(rows: Int) throws { try loadResources() }
        func prefill(text: Tensor) throws {}
        func step(tokens: Tensor, position: Int) throws -> (scaleLogit: Tensor, shift: Tensor) {
            try resource.perform { _ in (Tensor(zeros: tokens.shape), Tensor(zeros: tokens.shape)) }
        }
        func forward(tokens: Tensor, text: Tensor?) throws -> Tensor { try resource.perform { _ in tokens } }
        func vjp(tokens: Tensor, text: Tensor?, cotangent: Tensor) throws -> Tensor { try resource.perform { _ in cotangent } }
    }

    final class FakeEncoder: ConditionEncoding {
        private let resource: ManagedResource<Int>
        init(log: Log) { resource = ManagedResource(name: "encoder", onEvent: log.add) { 0 } }
        func loadResources() throws { try resource.loadResources() }
        func unloadResources() { resource.unloadResources() }
        func condition(for prompt: String) throws -> Tensor { try resource.perform { _ in Tensor(zeros: [2, 3, 5]) } }
    }

    final class FakeDecoder: LatentDecoding {
        private let resource: ManagedResource<Int>
        init(log: Log) { resource = ManagedResource(name: "decoder", onEvent: log.add) { 0 } }
        func loadResources() throws { try resource.loadResources() }
        func unloadResources() { resource.unloadResources() }
        func decode(_ latent: Tensor) throws -> Tensor { try resource.perform { _ in Tensor(zeros: [1, 3, 4, 6]) } }
    }

    func generator(reduceMemory: Bool, log: Log) throws -> StarFlowGenerator {
        let latent = ExportManifest.Latent(channels: 2, height: 2, width: 3, patchSize: 1)
        let blocks: [any StarFlowGenerator.Block] = [FakeBlock(index: 0, hasText: false, log: log), FakeBlock(index: 1, hasText: true, log: log)]
        return try StarFlowGenerator(latent: latent, blocks: blocks, useSoftplus: true, encoder: FakeEncoder(log: log),
                                     decoder: FakeDecoder(log: log), noiseStd: 0.3, reduceMemory: reduceMemory)
    }

    @Test func reduceMemoryHoldsOneStageAtATime() throws {
        let log = Log()
        let image = try generator(reduceMemory: true, log: log).generate(prompt: "a cat", configuration: GenerationConfiguration(seed: 1))
        #expect(image.image.width == 6 && image.image.height == 4)
        let once = { (name: String) in ["load \(name)", "unload \(name)"] }
        let sampling = once("block1") + once("block0")
        let scoreForward = once("block0") + once("block1")
        let scoreBackward = once("block1") + once("block0")
        #expect(log.events == once("encoder") + sampling + scoreForward + scoreBackward + once("decoder"))
    }

    @Test func withoutReduceMemoryEachStageLoadsOnceAndStays() throws {
        let log = Log()
        let generator = try generator(reduceMemory: false, log: log)
        _ = try generator.generate(prompt: "a cat", configuration: GenerationConfiguration(seed: 1))
        _ = try generator.generate(prompt: "a dog", configuration: GenerationConfiguration(seed: 2))
        #expect(log.events == ["load encoder", "load block1", "load block0", "load decoder"])
        generator.unloadResources()
        #expect(log.events.suffix(4) == ["unload encoder", "unload block1", "unload block0", "unload decoder"])
    }

    @Test func previewArrivesOnceAfterTheDeepBlock() throws {
        let log = Log()
        var configuration = GenerationConfiguration(seed: 3)
        configuration.preview = true
        configuration.method = .sequential
        var reports: [SampleProgress] = []
        _ = try generator(reduceMemory: false, log: log).generate(prompt: "x", configuration: configuration) { progress in
            reports.append(progress)
            return true
        }
        let previews = reports.enumerated().filter { $0.element.preview != nil }
        #expect(previews.count == 1)
        let index = try #require(previews.first?.offset)
        #expect(reports[..<index].allSatisfy { $0.block == 1 } && reports[(index + 1)...].allSatisfy { $0.block == 0 })
        #expect(previews.first?.element.preview?.width == 6)
    }

    @Test func asyncEntryPointStopsWhenCancelled() async throws {
        let generator = try generator(reduceMemory: false, log: Log())
        let image = try await generator.image(for: "x", configuration: GenerationConfiguration(seed: 4))
        #expect(image.prompt == "x")
        let task = Task {
            try await generator.image(for: "x", configuration: GenerationConfiguration(seed: 5)) { @Sendable _ in
                withUnsafeCurrentTask { $0?.cancel() }
                return true
            }
        }
        task.cancel()
        await #expect(throws: CancellationError.self) { try await task.value }
    }
}
