#if canImport(CoreML)
import CoreML
import Foundation

/// Text- or label-to-image generation with a Core ML export (`starflow export-coreml`): the
/// manifest names every package; loading compiles them, checks each function's inputs and
/// outputs against the manifest, and fails with the file at fault before any sampling.
///
/// `generate` encodes the prompt and the empty prompt (the unconditional rows), draws NumPy's
/// noise for the seed, inverts the flow deep block first, runs the score step and decodes.
/// The blocks hold one KV cache state each, so generations run one at a time: a concurrent call
/// waits for the running one, which makes the pipeline safe to share between tasks.
public final class StarFlowPipeline: @unchecked Sendable {
    public typealias Configuration = GenerationConfiguration

    public let manifest: ExportManifest
    private let sampler: FlowSampler
    private let tokenizer: T5Tokenizer?
    private let labels: LabelEncoder?
    private let textEncoder: TextEncoder?
    private let decoder: VAEDecoder?
    private let scoreStep: CoreMLScoreStep?
    private let running = NSLock()

    private init(manifest: ExportManifest, sampler: FlowSampler, tokenizer: T5Tokenizer?, labels: LabelEncoder?,
                 textEncoder: TextEncoder?, decoder: VAEDecoder?, scoreStep: CoreMLScoreStep?) {
        self.manifest = manifest
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.labels = labels
        self.textEncoder = textEncoder
        self.decoder = decoder
        self.scoreStep = scoreStep
    }

    /// Loads the export in `folder` with the given compute units (default `.cpuAndGPU`).
    public static func load(resourcesAt folder: URL, computeUnits: ComputeUnits = .cpuAndGPU) async throws -> StarFlowPipeline {
        let manifest = try ExportManifest.load(from: folder)
        func package(_ name: String) async throws -> CoreMLPackage {
            try await CoreMLPackage.compile(folder.appendingPathComponent(name))
        }
        func packages(_ names: [String]) async throws -> [CoreMLPackage] {
            var compiled: [CoreMLPackage] = []
            for name in names { compiled.append(try await package(name)) }
            return compiled
        }
        var blocks: [CoreMLFlowBlock] = []
        for spec in manifest.flow.blocks {
            blocks.append(try CoreMLFlowBlock(packages: try await packages(spec.packageChain), spec: spec, manifest: manifest, computeUnits: computeUnits))
        }
        let sampler = try FlowSampler(blocks: blocks, patchSize: manifest.latent.patchSize, useSoftplus: manifest.flow.useSoftplus)
        var tokenizer: T5Tokenizer?, textEncoder: TextEncoder?, labels: LabelEncoder?
        if let condition = manifest.condition, condition.kind == "labels" {
            labels = LabelEncoder(labels: condition.labels ?? [])
        } else if let spec = manifest.textEncoder, let tokenizerFile = manifest.condition?.tokenizer {
            tokenizer = try T5Tokenizer(contentsOf: folder.appendingPathComponent(tokenizerFile))
            textEncoder = try TextEncoder(packages: try await packages(spec.packageChain), manifest: manifest, computeUnits: computeUnits)
        }
        let decoder = try await manifest.vae.asyncMap {
            try VAEDecoder(package: try await package($0.package), manifest: manifest, computeUnits: computeUnits)
        }
        let scoreStep = try await manifest.scoreStep.asyncMap {
            try CoreMLScoreStep(package: try await package($0.package), manifest: manifest, computeUnits: computeUnits)
        }
        return StarFlowPipeline(manifest: manifest, sampler: sampler, tokenizer: tokenizer, labels: labels,
                                textEncoder: textEncoder, decoder: decoder, scoreStep: scoreStep)
    }

    /// One image for `prompt` (a caption, or a class label for label models; "" is unconditional;
    /// an unconditional model ignores the prompt and the guidance).
    /// A progress closure that returns false, or a cancelled task, throws `CancellationError`.
    public func generate(prompt: String, configuration: Configuration = Configuration(),
                         progress: ((SampleProgress) -> Bool)? = nil) throws -> GeneratedImage {
        try running.withLock { try generateAlone(prompt: prompt, configuration: configuration, progress: progress) }
    }

    private func generateAlone(prompt: String, configuration: Configuration, progress: ((SampleProgress) -> Bool)?) throws -> GeneratedImage {
        let condition = try self.condition(for: prompt)
        let latent = manifest.latent
        let noise = NumPyRandomSource.noise(seed: configuration.seed, shape: [1, latent.channels, latent.height, latent.width])
        var sampling = configuration.sampling
        if condition == nil { sampling.guidance = 0 }
        var sample = try sampler.sample(noise: noise, condition: condition, configuration: sampling, progress: progress).sample
        if configuration.denoise, let scoreStep {
            try Task.checkCancellation()
            sample = try sampler.denoise(sample, condition: condition, score: scoreStep)
        }
        try Task.checkCancellation()
        let image = try decoder?.decode(sample) ?? sample
        return GeneratedImage(image: try RGBImage(decoded: image), prompt: prompt, configuration: configuration)
    }

    /// The deep block's condition rows: the prompt's, then the empty prompt's, (2, T, D); nil
    /// for an unconditional model.
    private func condition(for prompt: String) throws -> Tensor? {
        guard let condition = manifest.condition else { return nil }
        if let labels {
            return try labels.oneHot([prompt, ""])
        }
        guard let tokenizer, let textEncoder else {
            throw StarFlowError.invalidFile(path: ExportManifest.fileName, problem: "a text model needs a tokenizer and a text encoder")
        }
        return try textEncoder.encode([try tokenizer.encode(prompt, length: condition.length), try tokenizer.encode("", length: condition.length)])
    }
}

private extension Optional {
    func asyncMap<T>(_ transform: (Wrapped) async throws -> T) async rethrows -> T? {
        guard let value = self else { return nil }
        return try await transform(value)
    }
}
#endif
