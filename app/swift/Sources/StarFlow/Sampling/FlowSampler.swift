import Foundation

/// Turns noise into a sample by inverting the flow blocks, deep block first, token by token or
/// by Jacobi iteration (the semantics of the Core ML contract and the MLX runtime).
///
/// Guidance acts on the deep block only, whose condition then holds conditional rows followed
/// by unconditional rows (2B rows for B noise rows); after it, only the first B rows go on.
/// A progress closure that returns false, or a cancelled task, stops sampling with
/// `CancellationError` — never a partial result.
public struct FlowSampler {
    /// Blocks in forward order, index 0…K−1; the last is the deep block.
    public let blocks: [any FlowBlock]
    public let patchSize: Int
    public let useSoftplus: Bool

    public init(blocks: [any FlowBlock], patchSize: Int, useSoftplus: Bool = true) throws {
        guard let deep = blocks.last else { throw StarFlowError.invalidArgument("a flow needs at least one block") }
        guard blocks.dropLast().allSatisfy({ !$0.hasText }) else {
            throw StarFlowError.invalidArgument("only the last (deep) block may read the condition")
        }
        guard blocks.allSatisfy({ $0.tokenChannels == deep.tokenChannels && $0.tokenCount == deep.tokenCount }) else {
            throw StarFlowError.invalidArgument("the flow blocks disagree on token count or channels")
        }
        self.blocks = blocks
        self.patchSize = patchSize
        self.useSoftplus = useSoftplus
    }

    /// Samples `noise` (B, C, H, W) under `condition` (rows, T, D) — text states or one-hot labels.
    public func sample(noise: Tensor, condition: Tensor?, configuration: SamplingConfiguration = SamplingConfiguration(),
                       progress: ((SampleProgress) -> Bool)? = nil) throws -> SampleResult {
        try sample(noise: noise, condition: condition, configuration: configuration, progress: progress, blockDone: nil)
    }

    /// `sample`, calling `blockDone` with each block's trace as soon as the block is inverted
    /// (the pipeline unloads the block there in reduce-memory mode, and decodes its preview).
    func sample(noise: Tensor, condition: Tensor?, configuration: SamplingConfiguration, progress: ((SampleProgress) -> Bool)?,
                blockDone: ((BlockTrace) throws -> Void)?) throws -> SampleResult {
        let layout = try self.layout(of: noise)
        try check(configuration)
        let batch = noise.shape[0]
        let guided = try checkCondition(condition, batch: batch, guidance: configuration.guidance)
        var run = SamplingRun(started: Date(), stageCount: blocks.count, tokensTotal: layout.tokenCount, progress: progress)
        var tokens = layout.tokens(from: noise)
        var traces: [BlockTrace] = []
        for (stage, index) in blocks.indices.reversed().enumerated() {
            let block = blocks[index]
            let text = block.hasText ? condition : nil
            let rows = text != nil && guided ? 2 * batch : batch
            var z = layout.ordered(tokens, rows: batch, flipped: block.flipped)
            if rows > batch { z += z }
            try block.reset(rows: rows)
            if let text { try block.prefill(text: text) }
            run.enter(block: index, stage: stage)
            let inversion = BlockInversion(block: block, rows: rows, prefix: text?.shape[1] ?? 0,
                                           guidance: text != nil && guided ? configuration.guidance : nil, useSoftplus: useSoftplus)
            let (x, chunks) = try inversion.invert(z, method: configuration.method, run: &run)
            tokens = layout.ordered(Array(x[0..<(batch * layout.tokenCount * layout.tokenChannels)]), rows: batch, flipped: block.flipped)
            traces.append(BlockTrace(block: index, output: layout.latent(from: tokens, batch: batch), jacobiChunks: chunks))
            try blockDone?(traces[traces.count - 1])
        }
        return SampleResult(sample: layout.latent(from: tokens, batch: batch), blocks: traces)
    }

    /// One score step on `latent` with the conditional rows of `condition` (the first B of 2B).
    public func denoise(_ latent: Tensor, condition: Tensor?, score: any ScoreFunction) throws -> Tensor {
        _ = try layout(of: latent)
        let batch = latent.shape[0]
        let conditional = condition.map { $0.shape[0] == 2 * batch ? $0.rows(0..<batch) : $0 }
        let denoised = try score.denoised(latent: latent, condition: conditional)
        guard denoised.shape == latent.shape else {
            throw StarFlowError.invalidArgument("the score step returned shape \(denoised.shape) for a latent of shape \(latent.shape)")
        }
        return denoised
    }

    private func layout(of noise: Tensor) throws -> TokenLayout {
        guard noise.shape.count == 4 else {
            throw StarFlowError.invalidArgument("noise must be (B, C, H, W), got shape \(noise.shape)")
        }
        let layout = try TokenLayout(channels: noise.shape[1], height: noise.shape[2], width: noise.shape[3], patchSize: patchSize)
        let deep = blocks[blocks.count - 1]
        guard layout.tokenChannels == deep.tokenChannels, layout.tokenCount == deep.tokenCount else {
            throw StarFlowError.invalidArgument("noise \(noise.shape) gives \(layout.tokenCount) tokens of \(layout.tokenChannels) channels; the blocks expect \(deep.tokenCount) of \(deep.tokenChannels)")
        }
        return layout
    }

    private func check(_ configuration: SamplingConfiguration) throws {
        guard configuration.guidance >= 0 else {
            throw StarFlowError.invalidArgument("guidance must not be negative, got \(configuration.guidance)")
        }
        try configuration.method.validate()
        guard case let .jacobi(blockSize, _, _, _) = configuration.method else { return }
        let largest = blocks.map(\.maxChunkSize).min() ?? 0
        guard blockSize <= largest else {
            throw StarFlowError.invalidArgument("the Jacobi blockSize \(blockSize) exceeds the largest chunk the blocks run (\(largest)); export a larger step function or lower it")
        }
    }

    /// Whether the deep block runs guided rows; checks the condition's shape either way.
    private func checkCondition(_ condition: Tensor?, batch: Int, guidance: Float) throws -> Bool {
        guard blocks[blocks.count - 1].hasText else {
            guard guidance == 0 else { throw StarFlowError.invalidArgument("guidance needs a conditioned model; this one has no condition input") }
            return false
        }
        guard let condition, condition.shape.count == 3 else {
            throw StarFlowError.invalidArgument("this model is conditioned: pass the condition states as (rows, T, D)")
        }
        switch condition.shape[0] {
        case 2 * batch:
            return true
        case batch where guidance == 0:
            return false
        default:
            throw StarFlowError.invalidArgument("with \(batch) noise rows the condition needs \(2 * batch) rows (conditional, then unconditional)\(guidance == 0 ? " or \(batch)" : " for guidance"), got \(condition.shape[0])")
        }
    }
}
