import Foundation
import StarFlow

/// `starflow-swift generate "prompt" --model DIR ...`: one PNG from a Core ML export.
enum GenerateCommand {
    static let usage = """
        starflow-swift generate "prompt" --model EXPORT_DIR [--seed N | --noise FILE [--noise-index 0]]
                       [--guidance 3.6] [--jacobi | --sequential]
                       [--jacobi-block-size 16] [--jacobi-threshold 0.001] [--jacobi-max-iter 32] [--jacobi-coupled]
                       [--no-denoise] [--reduce-memory]
                       [--output starflow.png] [--compute-units cpuAndGPU|all|cpuAndNeuralEngine|cpuOnly]
        """

    struct Request {
        let prompt: String
        let model: URL
        let output: URL
        let computeUnits: ComputeUnits
        let reduceMemory: Bool
        let configuration: GenerationConfiguration
        /// A noise file from `starflow invert` and the image of it to sample from, instead of the seed.
        var noise: (file: URL, index: Int)? = nil
    }

    static func parse(_ arguments: [String]) throws -> Request {
        let parsed = try ParsedArguments(
            arguments,
            options: ["model", "seed", "noise", "noise-index", "guidance", "jacobi-block-size", "jacobi-threshold", "jacobi-max-iter", "output", "compute-units"],
            flags: ["jacobi", "sequential", "jacobi-coupled", "no-denoise", "reduce-memory"])
        let prompt = try parsed.single("prompt")
        guard let model = parsed.string("model") else { throw UsageError("--model is required (a folder written by `starflow export-coreml`)") }
        guard !(parsed.has("jacobi") && parsed.has("sequential")) else { throw UsageError("choose one of --jacobi and --sequential") }
        let unitsName = parsed.string("compute-units") ?? ComputeUnits.cpuAndGPU.rawValue
        guard let units = ComputeUnits(rawValue: unitsName) else {
            throw UsageError("--compute-units must be one of \(ComputeUnits.allCases.map(\.rawValue).joined(separator: ", ")), got \(unitsName)")
        }
        var configuration = GenerationConfiguration()
        if let seed = try parsed.int("seed") {
            guard let value = UInt32(exactly: seed) else { throw UsageError("--seed must be between 0 and 4294967295") }
            configuration.seed = value
        }
        configuration.guidance = try parsed.float("guidance") ?? configuration.guidance
        configuration.method = try method(parsed)
        configuration.denoise = !parsed.has("no-denoise")
        var request = Request(prompt: prompt, model: URL(fileURLWithPath: model),
                              output: URL(fileURLWithPath: parsed.string("output") ?? "starflow.png"),
                              computeUnits: units, reduceMemory: parsed.has("reduce-memory"), configuration: configuration)
        request.noise = try noise(parsed)
        return request
    }

    /// `--noise FILE [--noise-index N]`; beside `--seed` it is a usage error (the seed would be ignored).
    private static func noise(_ parsed: ParsedArguments) throws -> (file: URL, index: Int)? {
        guard let file = parsed.string("noise") else {
            guard !parsed.given("noise-index") else { throw UsageError("--noise-index needs --noise FILE") }
            return nil
        }
        guard !parsed.given("seed") else { throw UsageError("choose one of --seed and --noise (the noise replaces the seed's)") }
        let index = try parsed.int("noise-index") ?? 0
        guard index >= 0 else { throw UsageError("--noise-index must be 0 or more, got \(index)") }
        return (URL(fileURLWithPath: file), index)
    }

    /// `--sequential`, or Jacobi (the default) with the `--jacobi-*` settings; a Jacobi setting
    /// beside `--sequential` is a usage error rather than silently ignored.
    private static func method(_ parsed: ParsedArguments) throws -> SamplingMethod {
        let jacobiOptions = ["jacobi-block-size", "jacobi-threshold", "jacobi-max-iter", "jacobi-coupled"].filter(parsed.given)
        if parsed.has("sequential") {
            guard jacobiOptions.isEmpty else { throw UsageError("--\(jacobiOptions[0]) needs Jacobi sampling; drop it or --sequential") }
            return .sequential
        }
        guard case let .jacobi(blockSize, threshold, maxIter, _) = SamplingMethod.officialJacobi else { return .officialJacobi }
        return .jacobi(blockSize: try parsed.int("jacobi-block-size") ?? blockSize,
                       threshold: try parsed.float("jacobi-threshold") ?? threshold,
                       maxIter: try parsed.int("jacobi-max-iter") ?? maxIter,
                       coupled: parsed.has("jacobi-coupled"))
    }

    static func run(_ arguments: [String], output: @escaping (String) -> Void) async throws {
        let request = try parse(arguments)
        #if canImport(CoreML)
        let pipeline = try await StarFlowPipeline.load(resourcesAt: request.model, computeUnits: request.computeUnits,
                                                       reduceMemory: request.reduceMemory)
        var lastBlock = -1
        let report: (SampleProgress) -> Bool = { progress in
            if progress.block != lastBlock || progress.tokensDone == progress.tokensTotal {
                lastBlock = progress.block
                output("block \(progress.block) (\(progress.stage + 1)/\(progress.stageCount)): \(progress.tokensDone)/\(progress.tokensTotal) tokens, \(progress.passes) passes, \(String(format: "%.1f", progress.elapsed)) s")
            }
            return true
        }
        let generated: GeneratedImage
        if let noise = request.noise {
            generated = try pipeline.generate(prompt: request.prompt, noiseFile: try NoiseFile(contentsOf: noise.file), index: noise.index,
                                              configuration: request.configuration, progress: report)
        } else {
            generated = try pipeline.generate(prompt: request.prompt, configuration: request.configuration, progress: report)
        }
        try PNGEncoder.write(generated.image, to: request.output)
        output("wrote \(request.output.path)")
        #else
        throw StarFlowError.coreMLUnavailable
        #endif
    }
}
