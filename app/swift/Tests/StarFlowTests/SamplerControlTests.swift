import Foundation
import Testing
@testable import StarFlow

/// The sampler's bookkeeping, on a fake block whose Gaussians are N(0, 1) (so x = z): call order,
/// positions, rows, chunking, argument checks and cancellation.
struct SamplerControlTests {
    static let layout = (channels: 2, height: 2, width: 3)

    func sampler(text: Bool = true, maxChunk: Int = .max) throws -> (FlowSampler, [RecordingBlock]) {
        let blocks = [RecordingBlock(flipped: true, hasText: false, maxChunk: maxChunk),
                      RecordingBlock(flipped: false, hasText: text, maxChunk: maxChunk)]
        return (try FlowSampler(blocks: blocks, patchSize: 1), blocks)
    }

    var noise: Tensor {
        Tensor(shape: [1, Self.layout.channels, Self.layout.height, Self.layout.width], values: (0..<12).map(Float.init))
    }

    var condition: Tensor { Tensor(zeros: [2, 3, 5]) }

    @Test func deepBlockRunsFirstWithGuidedRowsAndTextPositions() throws {
        let (sampler, blocks) = try sampler()
        let result = try sampler.sample(noise: noise, condition: condition, configuration: SamplingConfiguration(guidance: 1))
        #expect(result.blocks.map(\.block) == [1, 0])
        #expect(blocks[1].resets == [2] && blocks[0].resets == [1])
        #expect(blocks[1].prefills == [[2, 3, 5]] && blocks[0].prefills.isEmpty)
        #expect(blocks[1].steps.map(\.position) == [3, 4, 5, 6, 7, 8])
        #expect(blocks[0].steps.map(\.position) == [0, 1, 2, 3, 4, 5])
        #expect(result.sample == noise)
    }

    @Test func stepsReceiveThePreviousTokensInBlockOrder() throws {
        let (sampler, blocks) = try sampler()
        _ = try sampler.sample(noise: noise, condition: condition.rows(0..<1))
        let firstInputs = blocks[0].steps.prefix(2).map(\.tokens)
        #expect(firstInputs[0] == [-1, -1])
        #expect(firstInputs[1] == [5, 11])
    }

    @Test func jacobiChunksCoverTheTokensAtTheirPositions() throws {
        let (sampler, blocks) = try sampler()
        let result = try sampler.sample(noise: noise, condition: condition.rows(0..<1),
                                        configuration: SamplingConfiguration(method: .jacobi(blockSize: 4)))
        #expect(blocks[1].steps.map(\.position) == [3, 7])
        #expect(blocks[1].steps.map(\.count) == [4, 2])
        #expect(result.blocks[0].jacobiChunks.map(\.start) == [0, 4])
        #expect(result.blocks[0].jacobiChunks.map(\.iterations) == [1, 1])
        #expect(result.sample == noise)
    }

    @Test func progressThatSaysStopThrowsCancellation() throws {
        let (sampler, blocks) = try sampler()
        var reports: [SampleProgress] = []
        #expect(throws: CancellationError.self) {
            try sampler.sample(noise: noise, condition: condition.rows(0..<1)) { progress in
                reports.append(progress)
                return reports.count < 3
            }
        }
        #expect(reports.map(\.tokensDone) == [1, 2, 3])
        #expect(reports.allSatisfy { $0.block == 1 && $0.stage == 0 && $0.stageCount == 2 && $0.tokensTotal == 6 })
        #expect(blocks[0].steps.isEmpty)
    }

    @Test func cancelledTaskThrowsCancellation() async throws {
        let (sampler, _) = try sampler()
        let noise = self.noise, condition = self.condition
        let task = Task { () throws -> Int in
            withUnsafeCurrentTask { $0?.cancel() }
            return try sampler.sample(noise: noise, condition: condition).blocks.count
        }
        await #expect(throws: CancellationError.self) { try await task.value }
    }

    @Test func guidanceWithoutUnconditionalRowsIsRefused() throws {
        let (sampler, blocks) = try sampler()
        #expect(throws: StarFlowError.self) {
            try sampler.sample(noise: noise, condition: condition.rows(0..<1), configuration: SamplingConfiguration(guidance: 2))
        }
        #expect(blocks[1].resets.isEmpty)
    }

    @Test func chunksLargerThanTheBlocksRunAreRefusedUpFront() throws {
        let (sampler, blocks) = try sampler(maxChunk: 4)
        let error = #expect(throws: StarFlowError.self) {
            try sampler.sample(noise: noise, condition: condition, configuration: SamplingConfiguration(method: .jacobi(blockSize: 16)))
        }
        #expect(error?.description.contains("16") == true)
        #expect(blocks[1].resets.isEmpty)
    }

    @Test(arguments: [SamplingMethod.jacobi(blockSize: 0), .jacobi(maxIter: 0), .jacobi(threshold: -1)])
    func jacobiSettingsNoLoopCanRunAreRefused(method: SamplingMethod) throws {
        let (sampler, blocks) = try sampler()
        #expect(throws: StarFlowError.self) {
            try sampler.sample(noise: noise, condition: condition, configuration: SamplingConfiguration(method: method))
        }
        #expect(blocks[1].resets.isEmpty)
    }

    @Test func noiseOfAnotherSizeIsRefused() throws {
        let (sampler, _) = try sampler()
        #expect(throws: StarFlowError.self) {
            try sampler.sample(noise: Tensor(zeros: [1, 2, 4, 4]), condition: condition)
        }
    }

    @Test func denoiseUsesTheConditionalRowsOnly() throws {
        let (sampler, _) = try sampler()
        let condition = Tensor(shape: [2, 1, 1], values: [7, 9])
        let score = RecordingScore()
        let denoised = try sampler.denoise(noise, condition: condition, score: score)
        #expect(score.conditions == [Tensor(shape: [1, 1, 1], values: [7])])
        #expect(denoised.values == noise.values.map { $0 * 0.5 })
    }
}

/// A flow block predicting N(0, 1) for every token (scale logit 0 means σ = 1), recording how the sampler calls it.
final class RecordingBlock: FlowBlock {
    struct Step: Equatable {
        let position: Int
        let count: Int
        let tokens: [Float]
    }

    let flipped: Bool
    let hasText: Bool
    let maxChunkSize: Int
    let tokenChannels = 2
    let tokenCount = 6
    let sos: [Float] = [-1, -1]
    private(set) var resets: [Int] = []
    private(set) var prefills: [[Int]] = []
    private(set) var steps: [Step] = []

    init(flipped: Bool, hasText: Bool, maxChunk: Int) {
        self.flipped = flipped
        self.hasText = hasText
        maxChunkSize = maxChunk
    }

    func reset(rows: Int) throws { resets.append(rows) }
    func prefill(text: Tensor) throws { prefills.append(text.shape) }
    func step(tokens: Tensor, position: Int) throws -> (scaleLogit: Tensor, shift: Tensor) {
        steps.append(Step(position: position, count: tokens.shape[1], tokens: tokens.values))
        return (Tensor(zeros: tokens.shape), Tensor(zeros: tokens.shape))
    }
}

/// A score step that halves the latent and records the condition it was given.
final class RecordingScore: ScoreFunction {
    private(set) var conditions: [Tensor] = []

    func denoised(latent: Tensor, condition: Tensor?) throws -> Tensor {
        if let condition { conditions.append(condition) }
        return Tensor(shape: latent.shape, values: latent.values.map { $0 * 0.5 })
    }
}
