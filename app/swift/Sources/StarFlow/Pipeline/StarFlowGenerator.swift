import Foundation

/// One generation, stage by stage, whatever runs the stages (Core ML on Apple platforms, fakes
/// in the tests): encode the prompt, invert the flow deep block first, denoise through the
/// blocks' own `forward`/`vjp`, decode.
///
/// Every stage loads on first use. With `reduceMemory`, each stage is also unloaded as soon as
/// it is done — the text encoder after encoding, each flow block after its inversion and after
/// each of its score-step calls, the decoder after decoding — so the peak is the largest single
/// stage instead of their sum, at the price of loading every block three times per image.
/// Generations run one at a time: the blocks hold one KV cache each.
public final class StarFlowGenerator: @unchecked Sendable {
    public typealias Block = FlowBlock & LikelihoodBlock & ResourceManaging

    public let latent: ExportManifest.Latent
    public let reduceMemory: Bool
    let sampler: FlowSampler
    private let blocks: [any Block]
    private let encoder: (any ConditionEncoding)?
    private let decoder: (any LatentDecoding)?
    private let noiseStd: Float?
    private let running = NSLock()

    /// `noiseStd` nil: the export has no score step, and `denoise` is skipped.
    public init(latent: ExportManifest.Latent, blocks: [any Block], useSoftplus: Bool, encoder: (any ConditionEncoding)?,
                decoder: (any LatentDecoding)?, noiseStd: Float?, reduceMemory: Bool) throws {
        self.latent = latent
        self.blocks = blocks
        self.encoder = encoder
        self.decoder = decoder
        self.noiseStd = noiseStd
        self.reduceMemory = reduceMemory
        sampler = try FlowSampler(blocks: blocks, patchSize: latent.patchSize, useSoftplus: useSoftplus)
    }

    /// Every stage, in the order a generation uses them.
    public var resources: [any ResourceManaging] {
        var all: [any ResourceManaging] = []
        if let encoder { all.append(encoder) }
        all += blocks.reversed().map { $0 as any ResourceManaging }
        if let decoder { all.append(decoder) }
        return all
    }

    /// Loads every stage now (without `reduceMemory`), or prewarms each (with it), so the first
    /// generation does not pay for loading.
    public func prepare() throws {
        for resource in resources {
            if reduceMemory { try resource.prewarmResources() } else { try resource.loadResources() }
        }
    }

    /// Gives back the memory of every stage; the next generation loads them again.
    public func unloadResources() {
        for resource in resources { resource.unloadResources() }
    }

    /// One image for `prompt` (a caption, a class label, or "" for unconditional; an unconditional
    /// model ignores prompt and guidance). A progress closure that returns false, or a cancelled
    /// task, throws `CancellationError`.
    public func generate(prompt: String, configuration: GenerationConfiguration,
                         progress: ((SampleProgress) -> Bool)? = nil) throws -> GeneratedImage {
        let noise = NumPyRandomSource.noise(seed: configuration.seed, shape: noiseShape)
        return try running.withLock { try generateAlone(prompt: prompt, noise: noise, configuration: configuration, progress: progress) }
    }

    /// One image for `prompt` sampled from the given latent noise instead of the seed's (the seed
    /// in `configuration` is ignored): Python's `generate --noise`. Pass one image of a
    /// `NoiseFile` written by `starflow invert` to reproduce or edit the inverted image. The
    /// noise must be (1, channels, height, width) of this export's latent, and finite.
    public func generate(prompt: String, noise: Tensor, configuration: GenerationConfiguration,
                         progress: ((SampleProgress) -> Bool)? = nil) throws -> GeneratedImage {
        try check(noise: noise)
        return try running.withLock { try generateAlone(prompt: prompt, noise: noise, configuration: configuration, progress: progress) }
    }

    /// The noise shape one generation samples from: (1, channels, height, width) of the latent.
    public var noiseShape: [Int] { [1, latent.channels, latent.height, latent.width] }

    private func check(noise: Tensor) throws {
        guard noise.shape == noiseShape else {
            let grid = "\(latent.width)x\(latent.height)"
            throw StarFlowError.invalidArgument("the noise has shape \(noise.shape), but this export samples \(noiseShape) (one image, a \(grid) latent); "
                                                + "pass one image of noise inverted at this export's size, or export for the noise's size")
        }
        guard noise.values.allSatisfy(\.isFinite) else {
            throw StarFlowError.invalidArgument("the noise holds NaN or infinite values, which sample blank images; invert the image again")
        }
    }

    /// `generate` off the caller's thread, for async code; cancelling the calling task stops it
    /// between model calls. (A distinct name: an async overload of `generate` would capture every
    /// call made from async code, which then could not call the synchronous one.)
    public func image(for prompt: String, configuration: GenerationConfiguration,
                      progress: (@Sendable (SampleProgress) -> Bool)? = nil) async throws -> GeneratedImage {
        let task = Task.detached(priority: .userInitiated) {
            try self.generate(prompt: prompt, configuration: configuration, progress: progress)
        }
        return try await withTaskCancellationHandler { try await task.value } onCancel: { task.cancel() }
    }

    private func generateAlone(prompt: String, noise: Tensor, configuration: GenerationConfiguration,
                               progress: ((SampleProgress) -> Bool)?) throws -> GeneratedImage {
        let condition = try encoder.map { encoder in try stage(encoder) { try encoder.condition(for: prompt) } }
        var sampling = configuration.sampling
        if condition == nil { sampling.guidance = 0 }
        let deep = blocks.count - 1
        let started = Date()
        var sample = try sampler.sample(noise: noise, condition: condition, configuration: sampling, progress: progress) { trace in
            if self.reduceMemory { self.blocks[trace.block].unloadResources() }
            guard configuration.preview, trace.block == deep, let progress else { return }
            var report = SampleProgress(block: deep, stage: 0, stageCount: self.blocks.count, tokensDone: self.blocks[deep].tokenCount,
                                        tokensTotal: self.blocks[deep].tokenCount, passes: 0, elapsed: Date().timeIntervalSince(started))
            report.preview = try self.image(from: trace.output)
            if !progress(report) { throw CancellationError() }
        }.sample
        if configuration.denoise, let noiseStd {
            try Task.checkCancellation()
            let release: ((Int) -> Void)? = reduceMemory ? { self.blocks[$0].unloadResources() } : nil
            let score = BlockScoreStep(blocks: blocks, patchSize: latent.patchSize, noiseStd: noiseStd, release: release)
            sample = try sampler.denoise(sample, condition: condition, score: score)
        }
        try Task.checkCancellation()
        return GeneratedImage(image: try image(from: sample), prompt: prompt, configuration: configuration)
    }

    /// The decoded image of a flow latent (a pixel-space flow's latent is the image).
    private func image(from latent: Tensor) throws -> RGBImage {
        guard let decoder else { return try RGBImage(decoded: latent) }
        return try RGBImage(decoded: try stage(decoder) { try decoder.decode(latent) })
    }

    private func stage<T>(_ resource: any ResourceManaging, _ body: () throws -> T) throws -> T {
        try resource.loadResources()
        defer { if reduceMemory { resource.unloadResources() } }
        return try body()
    }
}
