import Foundation

/// `manifest.json` of a Core ML export (`starflow export-coreml`): the one contract between the
/// Python exporter and this package. Every file name, shape and switch is read from it; nothing
/// is guessed from names.
public struct ExportManifest: Decodable, Sendable, Equatable {
    public static let fileName = "manifest.json"
    public static let format = "mlx-starflow-coreml"
    public static let formatVersion = 2

    public struct Model: Decodable, Sendable, Equatable {
        public let name: String?
        public let license: String?
    }

    public struct Image: Decodable, Sendable, Equatable {
        public let height: Int
        public let width: Int
        public let channels: Int
    }

    public struct Latent: Decodable, Sendable, Equatable {
        public let channels: Int
        public let height: Int
        public let width: Int
        public let patchSize: Int

        enum CodingKeys: String, CodingKey {
            case channels, height, width
            case patchSize = "patch_size"
        }
    }

    public struct Condition: Decodable, Sendable, Equatable {
        /// "text" (T5 states) or "labels" (one-hot over the labels plus the empty class).
        public let kind: String
        public let length: Int
        public let dim: Int
        public let tokenizer: String?
        public let labels: [String]?
    }

    public struct VAE: Decodable, Sendable, Equatable {
        public let package: String
        /// The flow latent is divided by this before the decoder.
        public let scalingFactor: Float
        public let factor: Int
        /// Input and output names; when absent, the package's only input and output.
        public let input: String?
        public let output: String?

        enum CodingKeys: String, CodingKey {
            case package, factor, input, output
            case scalingFactor = "scaling_factor"
        }
    }

    /// The state a package split by layers hands to the next: its output name in one package and
    /// its input name in the next (one string in the manifest means both).
    public struct HiddenNames: Decodable, Sendable, Equatable {
        public let input: String
        public let output: String

        public init(input: String, output: String) {
            self.input = input
            self.output = output
        }

        private enum Keys: String, CodingKey { case input, output }

        public init(from decoder: Decoder) throws {
            if let name = try? decoder.singleValueContainer().decode(String.self) {
                self.init(input: name, output: name)
                return
            }
            let container = try decoder.container(keyedBy: Keys.self)
            self.init(input: try container.decode(String.self, forKey: .input), output: try container.decode(String.self, forKey: .output))
        }
    }

    public struct Block: Decodable, Sendable, Equatable {
        public struct Functions: Decodable, Sendable, Equatable {
            public let prefill: String?
            /// Chunk size (as a decimal string) → function name.
            public let step: [String: String]
            /// The score step's functions (absent when the export has no score step): the block in the
            /// likelihood direction over one image, and its vector-Jacobian product.
            public let forward: String?
            public let vjp: String?
        }

        public struct Inputs: Decodable, Sendable, Equatable {
            public let tokens: String
            public let position: String
            public let text: String?
        }

        public struct Outputs: Decodable, Sendable, Equatable {
            public let scaleLogit: String
            public let shift: String

            enum CodingKeys: String, CodingKey {
                case shift
                case scaleLogit = "scale_logit"
            }
        }

        /// The state-sharing fallback (`--state-fallback`): twins of the sampling functions that
        /// take each KV cache as an input and return it updated (`caches`: input → output name),
        /// for devices that refuse one Core ML state shared by several functions.
        public struct CacheIO: Decodable, Sendable, Equatable {
            public struct Functions: Decodable, Sendable, Equatable {
                public let step: [String: String]
                public let prefill: String?
            }

            public let functions: Functions
            public let caches: [String: String]
        }

        /// `--step-tables`: the step functions take their RoPE rows and causal mask as inputs; the
        /// table (cos rows, then sin rows, float32 little-endian, cache length × head_dim) is `file`.
        public struct StepTablesSpec: Decodable, Sendable, Equatable {
            public struct Inputs: Decodable, Sendable, Equatable {
                public let ropeCos: String
                public let ropeSin: String
                public let mask: String

                enum CodingKeys: String, CodingKey {
                    case mask
                    case ropeCos = "rope_cos"
                    case ropeSin = "rope_sin"
                }
            }

            public let file: String
            public let headDim: Int
            public let inputs: Inputs

            enum CodingKeys: String, CodingKey {
                case file, inputs
                case headDim = "head_dim"
            }
        }

        public let index: Int
        public let package: String
        /// The block's packages in order when it is split by layers (each passes `hidden` on).
        public let packages: [String]?
        public let hidden: HiddenNames?
        public let flipped: Bool
        public let hasText: Bool
        public let rows: Int
        public let tokens: Int
        public let tokenChannels: Int
        public let textLength: Int
        public let cacheLength: Int
        public let sos: [Float]
        public let functions: Functions
        public let inputs: Inputs
        public let outputs: Outputs
        /// The layers of each package, in order (absent in older manifests: one package).
        public let layers: [[Int]]?
        public let cacheIO: CacheIO?
        public let stepTables: StepTablesSpec?

        enum CodingKeys: String, CodingKey {
            case index, package, packages, hidden, flipped, rows, tokens, sos, functions, inputs, outputs, layers
            case cacheIO = "cache_io"
            case stepTables = "step_tables"
            case hasText = "has_text"
            case tokenChannels = "token_channels"
            case textLength = "text_length"
            case cacheLength = "cache_length"
        }

        /// Every package of the block, in the order a step runs through them.
        public var packageChain: [String] { packages ?? [package] }

        /// The step functions by chunk size, smallest first.
        public var stepFunctions: [(size: Int, name: String)] {
            functions.step.compactMap { key, name in Int(key).map { ($0, name) } }.sorted { $0.size < $1.size }
        }

        /// The cache-IO twins of the step functions by chunk size, smallest first (empty without the fallback).
        public var cacheIOStepFunctions: [(size: Int, name: String)] {
            (cacheIO?.functions.step ?? [:]).compactMap { key, name in Int(key).map { ($0, name) } }.sorted { $0.size < $1.size }
        }

        /// The KV cache inputs of package `part` (input → updated output name), for the cache-IO twins.
        public func caches(part: Int) -> [String: String] {
            guard let cacheIO else { return [:] }
            guard let layers = layers?[part] else { return cacheIO.caches }
            let own = Set(layers.flatMap { ["key_cache_\($0)", "value_cache_\($0)"] })
            return cacheIO.caches.filter { own.contains($0.key) }
        }
    }

    public struct Flow: Decodable, Sendable, Equatable {
        public let useSoftplus: Bool
        public let noiseStd: Float
        public let blocks: [Block]

        enum CodingKeys: String, CodingKey {
            case blocks
            case useSoftplus = "use_softplus"
            case noiseStd = "noise_std"
        }
    }

    public struct TextEncoder: Decodable, Sendable, Equatable {
        public struct Inputs: Decodable, Sendable, Equatable {
            public let inputIds: String
            public let attentionMask: String

            enum CodingKeys: String, CodingKey {
                case inputIds = "input_ids"
                case attentionMask = "attention_mask"
            }
        }

        public let package: String
        /// The encoder's packages in order when it is split by layers (each passes `hidden` on).
        public let packages: [String]?
        public let hidden: HiddenNames?
        public let inputs: Inputs
        public let output: String

        public var packageChain: [String] { packages ?? [package] }
    }

    /// The score-step denoise, x − σ²·∇ₓ[D·nll(x)], run through every block's `forward` and
    /// `vjp` functions (which share the block's weights): the names those functions use.
    public struct ScoreStep: Decodable, Sendable, Equatable {
        public struct Inputs: Decodable, Sendable, Equatable {
            public let tokens: String
            public let hidden: String
            public let cotangent: String
            public let text: String?
        }

        public struct Outputs: Decodable, Sendable, Equatable {
            public let z: String
            public let nextHidden: String
            public let tokensCotangent: String
            public let hiddenCotangent: String

            enum CodingKeys: String, CodingKey {
                case z
                case nextHidden = "next_hidden"
                case tokensCotangent = "tokens_cotangent"
                case hiddenCotangent = "hidden_cotangent"
            }
        }

        public let noiseStd: Float
        public let inputs: Inputs
        public let outputs: Outputs

        enum CodingKeys: String, CodingKey {
            case inputs, outputs
            case noiseStd = "noise_std"
        }
    }

    public let format: String
    public let formatVersion: Int
    public let model: Model?
    public let precision: String?
    /// How the KV cache is kept: "state" (Core ML state, what this package runs) or "io".
    public let kvCache: String?
    /// Images per flow-block call.
    public let batch: Int?
    public let image: Image
    public let latent: Latent
    /// Nil for an unconditional model.
    public let condition: Condition?
    public let vae: VAE?
    public let flow: Flow
    public let textEncoder: TextEncoder?
    public let scoreStep: ScoreStep?

    enum CodingKeys: String, CodingKey {
        case format, model, precision, image, latent, condition, vae, flow
        case batch
        case formatVersion = "format_version"
        case kvCache = "kv_cache"
        case textEncoder = "text_encoder"
        case scoreStep = "score_step"
    }

    /// Reads and checks `folder/manifest.json` and that every package it names is in `folder`.
    public static func load(from folder: URL) throws -> ExportManifest {
        let url = folder.appendingPathComponent(fileName)
        guard let data = FileManager.default.contents(atPath: url.path) else {
            throw StarFlowError.fileNotFound(path: url.path, fix: "point at a folder written by `starflow export-coreml`")
        }
        let manifest = try decode(data, source: url.path)
        try manifest.validate(source: url.path)
        try manifest.checkFiles(in: folder)
        return manifest
    }

    static func decode(_ data: Data, source: String) throws -> ExportManifest {
        if let header = try? JSONDecoder().decode(FormatHeader.self, from: data),
           header.format != format || header.formatVersion != formatVersion {
            throw StarFlowError.invalidFile(path: source, problem: "format \(header.format ?? "?") version \(header.formatVersion.map(String.init) ?? "?") is not \(format) version \(formatVersion); export the model again with this version of mlx-starflow")
        }
        do {
            return try JSONDecoder().decode(ExportManifest.self, from: data)
        } catch let error as DecodingError {
            throw StarFlowError.invalidFile(path: source, problem: "is not a valid export manifest (\(Self.describe(error)))")
        } catch {
            throw StarFlowError.invalidFile(path: source, problem: "is not valid JSON (\(error.localizedDescription))")
        }
    }

    private struct FormatHeader: Decodable {
        let format: String?
        let formatVersion: Int?

        enum CodingKeys: String, CodingKey {
            case format
            case formatVersion = "format_version"
        }
    }

    private static func describe(_ error: DecodingError) -> String {
        func path(_ context: DecodingError.Context) -> String {
            context.codingPath.map { $0.intValue.map(String.init) ?? $0.stringValue }.joined(separator: ".")
        }
        switch error {
        case let .keyNotFound(key, context):
            let parent = path(context)
            return "missing \(parent.isEmpty ? key.stringValue : "\(parent).\(key.stringValue)")"
        case let .typeMismatch(_, context), let .valueNotFound(_, context), let .dataCorrupted(context):
            return "\(path(context)): \(context.debugDescription)"
        @unknown default:
            return "\(error)"
        }
    }
}
