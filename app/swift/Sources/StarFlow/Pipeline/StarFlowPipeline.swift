#if canImport(CoreML)
import CoreML
import Foundation

/// Text- or label-to-image generation with a Core ML export (`starflow export-coreml`): the
/// manifest names every model; loading compiles each `.mlpackage` once into the compiled-model
/// cache (or takes a bundled `.mlmodelc` as it is) and checks each function's inputs and
/// outputs against the manifest when it first loads, failing with the file at fault.
///
/// `generate` encodes the prompt and the empty prompt (the unconditional rows), draws NumPy's
/// noise for the seed, inverts the flow deep block first, runs the score step through the
/// blocks' own `forward`/`vjp` functions and decodes (`StarFlowGenerator`). Models load on
/// first use; `reduceMemory` unloads each stage once it is done. Generations run one at a time,
/// so the pipeline is safe to share between tasks.
public final class StarFlowPipeline: @unchecked Sendable {
    public typealias Configuration = GenerationConfiguration

    public let manifest: ExportManifest
    public let generator: StarFlowGenerator

    private init(manifest: ExportManifest, generator: StarFlowGenerator) {
        self.manifest = manifest
        self.generator = generator
    }

    /// Loads the export in `folder` with the given compute units (default `.cpuAndGPU`).
    /// Compiling happens here, once per package content and OS build (`cache`); loading the
    /// compiled models waits for their first use, or for `prewarm()`.
    public static func load(resourcesAt folder: URL, computeUnits: ComputeUnits = .cpuAndGPU, reduceMemory: Bool = false,
                            cache: CompiledModelCache? = nil) async throws -> StarFlowPipeline {
        let manifest = try ExportManifest.load(from: folder)
        let cache = try cache ?? CompiledModelCache.standard()
        _ = try? cache.prune()
        func packages(_ names: [String]) async throws -> [CoreMLPackage] {
            var prepared: [CoreMLPackage] = []
            for name in names { prepared.append(try await CoreMLPackage.prepare(name, in: folder, cache: cache)) }
            return prepared
        }
        var blocks: [any StarFlowGenerator.Block] = []
        for spec in manifest.flow.blocks {
            let tables = spec.stepTables == nil ? nil : try StepTables(block: spec, folder: folder)
            blocks.append(CoreMLFlowBlock(packages: try await packages(spec.packageChain), spec: spec, manifest: manifest,
                                          computeUnits: computeUnits, tables: tables))
        }
        var encoder: (any ConditionEncoding)?
        if let condition = manifest.condition, condition.kind == "labels" {
            encoder = LabelCondition(encoder: LabelEncoder(labels: condition.labels ?? []))
        } else if let condition = manifest.condition, let spec = manifest.textEncoder, let tokenizerFile = condition.tokenizer {
            let tokenizer = try T5Tokenizer(contentsOf: folder.appendingPathComponent(tokenizerFile))
            let textEncoder = try TextEncoder(packages: try await packages(spec.packageChain), manifest: manifest, computeUnits: computeUnits)
            encoder = TextCondition(tokenizer: tokenizer, encoder: textEncoder, length: condition.length)
        }
        var decoder: (any LatentDecoding)?
        if let vae = manifest.vae {
            decoder = try VAEDecoder(package: try await CoreMLPackage.prepare(vae.package, in: folder, cache: cache), manifest: manifest, computeUnits: computeUnits)
        }
        let generator = try StarFlowGenerator(latent: manifest.latent, blocks: blocks, useSoftplus: manifest.flow.useSoftplus,
                                              encoder: encoder, decoder: decoder, noiseStd: manifest.scoreStep?.noiseStd,
                                              reduceMemory: reduceMemory)
        return StarFlowPipeline(manifest: manifest, generator: generator)
    }

    /// Loads every model now (or, with `reduceMemory`, loads and unloads each once), so the first
    /// generation does not wait for Core ML's first load.
    public func prewarm() throws { try generator.prepare() }

    /// Gives back the memory of every loaded model; they load again on next use.
    public func unloadResources() { generator.unloadResources() }

    /// One image for `prompt` (a caption, or a class label for label models; "" is unconditional;
    /// an unconditional model ignores the prompt and the guidance).
    /// A progress closure that returns false, or a cancelled task, throws `CancellationError`.
    public func generate(prompt: String, configuration: Configuration = Configuration(),
                         progress: ((SampleProgress) -> Bool)? = nil) throws -> GeneratedImage {
        try generator.generate(prompt: prompt, configuration: configuration, progress: progress)
    }

    /// One image for `prompt` sampled from `noise` (1, channels, height, width) instead of the
    /// seed's: Python's `generate --noise`. Throws when the noise does not fit this export.
    public func generate(prompt: String, noise: Tensor, configuration: Configuration = Configuration(),
                         progress: ((SampleProgress) -> Bool)? = nil) throws -> GeneratedImage {
        try generator.generate(prompt: prompt, noise: noise, configuration: configuration, progress: progress)
    }

    /// One image for `prompt` from image `index` of a noise file written by `starflow invert`,
    /// after checking that the file was made with this export's model.
    public func generate(prompt: String, noiseFile: NoiseFile, index: Int = 0, configuration: Configuration = Configuration(),
                         progress: ((SampleProgress) -> Bool)? = nil) throws -> GeneratedImage {
        try noiseFile.check(model: manifest.model?.name)
        return try generate(prompt: prompt, noise: noiseFile.image(index), configuration: configuration, progress: progress)
    }

    /// `generate` off the caller's thread, for async code; cancelling the calling task stops it between model calls.
    public func image(for prompt: String, configuration: Configuration = Configuration(),
                      progress: (@Sendable (SampleProgress) -> Bool)? = nil) async throws -> GeneratedImage {
        try await generator.image(for: prompt, configuration: configuration, progress: progress)
    }
}
#endif
