import Foundation
import StarFlow

/// The converted flow folder's `config.json` (schema `starflow.flow`, version 1), read as
/// strictly as the Python runtime reads it: another kind or version, an unknown key or a
/// missing required key is an error, because a wrong switch gives plausible but wrong numbers.
public struct FlowModelConfig: Sendable, Equatable {
    public static let kind = "starflow.flow"
    public static let version = 1

    public let inChannels: Int
    public let latentSize: Int
    public let patchSize: Int
    public let channels: Int
    public let layersPerBlock: [Int]
    public let txtSize: Int
    public let txtDim: Int
    public let headDim: Int
    public let expansion: Double
    public let seqOrder: String
    public let useSoftplus: Bool
    public let softClip: Float
    public let useFinalNorm: Bool
    public let useBias: Bool
    public let layerNormEps: Float
    public let rmsNormEps: Float
    public let ropeTheta: Float
    public let noiseStd: Float

    public var numBlocks: Int { layersPerBlock.count }
    public var numHeads: Int { channels / headDim }
    public var tokenChannels: Int { inChannels * patchSize * patchSize }
    /// Token grid side at the training size; RoPE positions are scaled to it.
    public var ptSeqLen: Int { latentSize / patchSize }
    public var hiddenChannels: Int { Int(Double(channels) * expansion) }

    /// Token order of block `index`: the official permutation rule for L2R and R2L.
    public func blockIsFlipped(_ index: Int) -> Bool {
        (index + (seqOrder == "L2R" ? 1 : 0)) % 2 == 1
    }

    private static let required = ["in_channels", "latent_size", "patch_size", "channels", "layers_per_block", "txt_size", "txt_dim"]
    private static let optional = [
        "head_dim", "expansion", "seq_order", "use_softplus", "soft_clip", "use_final_norm", "use_bias",
        "layer_norm_eps", "rms_norm_eps", "rope_theta", "noise_std", "drop_label", "latent_norm_regularization",
        "vae_factor", "dtype", "quantization",
    ]

    public init(contentsOf url: URL) throws {
        guard let data = FileManager.default.contents(atPath: url.path) else {
            throw StarFlowError.fileNotFound(path: url.path, fix: "point at a flow folder converted with `starflow convert`")
        }
        guard let object = try? JSONSerialization.jsonObject(with: data), let json = object as? [String: Any] else {
            throw StarFlowError.invalidFile(path: url.path, problem: "is not a JSON object; convert the model again")
        }
        try self.init(json: json, source: url.path)
    }

    public init(json: [String: Any], source: String) throws {
        let reader = ConfigReader(json: json, source: source)
        let kind = try reader.string("kind")
        guard kind == Self.kind else {
            throw StarFlowError.invalidFile(path: source, problem: "kind is \(kind), expected \(Self.kind); point at a converted flow folder")
        }
        guard try reader.int("version") == Self.version else {
            throw StarFlowError.invalidFile(path: source, problem: "schema version is not \(Self.version); convert the model again with `starflow convert`")
        }
        let unknown = Set(json.keys).subtracting(Self.required + Self.optional + ["kind", "version"]).sorted()
        guard unknown.isEmpty else {
            throw StarFlowError.invalidFile(path: source, problem: "unknown keys \(unknown); was it written by a newer mlx-starflow?")
        }
        let missing = Self.required.filter { json[$0] == nil }
        guard missing.isEmpty else {
            throw StarFlowError.invalidFile(path: source, problem: "missing keys \(missing)")
        }
        inChannels = try reader.int("in_channels")
        latentSize = try reader.int("latent_size")
        patchSize = try reader.int("patch_size")
        channels = try reader.int("channels")
        layersPerBlock = try reader.ints("layers_per_block")
        txtSize = try reader.int("txt_size")
        txtDim = try reader.int("txt_dim")
        headDim = try reader.int("head_dim", default: 64)
        expansion = try reader.double("expansion", default: 4)
        seqOrder = try reader.string("seq_order", default: "L2R")
        useSoftplus = try reader.bool("use_softplus", default: true)
        softClip = Float(try reader.double("soft_clip", default: 4))
        useFinalNorm = try reader.bool("use_final_norm", default: true)
        useBias = try reader.bool("use_bias", default: true)
        layerNormEps = Float(try reader.double("layer_norm_eps", default: 1e-5))
        rmsNormEps = Float(try reader.double("rms_norm_eps", default: 1e-6))
        ropeTheta = Float(try reader.double("rope_theta", default: 10000))
        noiseStd = Float(try reader.double("noise_std", default: 0.3))
        if let quantization = json["quantization"], !(quantization is NSNull) {
            throw StarFlowError.invalidFile(path: source, problem: "holds a quantized flow; the reference backend needs float weights (convert without --quantize)")
        }
        try validate(source: source)
    }

    private func validate(source: String) throws {
        func fail(_ problem: String) -> StarFlowError { .invalidFile(path: source, problem: problem) }
        guard seqOrder == "L2R" || seqOrder == "R2L" else { throw fail("seq_order must be L2R or R2L, not \(seqOrder)") }
        guard headDim > 0, channels % headDim == 0 else { throw fail("channels \(channels) is not a multiple of head_dim \(headDim)") }
        guard headDim % 4 == 0 else { throw fail("head_dim \(headDim) must be a multiple of 4 for the 3-axis RoPE") }
        guard !layersPerBlock.isEmpty, layersPerBlock.allSatisfy({ $0 > 0 }) else { throw fail("layers_per_block must list one positive count per block") }
        guard patchSize > 0, latentSize % patchSize == 0 else { throw fail("latent_size \(latentSize) is not a multiple of patch_size \(patchSize)") }
        guard inChannels > 0, txtDim >= 0, txtSize >= 0 else { throw fail("in_channels, txt_dim and txt_size must not be negative") }
    }
}

/// Typed look-ups in a decoded JSON object, each failing with the key's name.
struct ConfigReader {
    let json: [String: Any]
    let source: String

    func string(_ key: String, default fallback: String? = nil) throws -> String {
        try value(key, fallback) { $0 as? String }
    }

    func bool(_ key: String, default fallback: Bool? = nil) throws -> Bool {
        try value(key, fallback) { $0 as? Bool }
    }

    func int(_ key: String, default fallback: Int? = nil) throws -> Int {
        try value(key, fallback) { Self.integer($0) }
    }

    func double(_ key: String, default fallback: Double? = nil) throws -> Double {
        try value(key, fallback) { ($0 as? NSNumber)?.doubleValue ?? ($0 as? Double) }
    }

    func ints(_ key: String) throws -> [Int] {
        try value(key, nil) { ($0 as? [Any]).flatMap { items in
            let numbers = items.compactMap(Self.integer)
            return numbers.count == items.count ? numbers : nil
        } }
    }

    private func value<T>(_ key: String, _ fallback: T?, _ cast: (Any) -> T?) throws -> T {
        guard let raw = json[key], !(raw is NSNull) else {
            if let fallback { return fallback }
            throw StarFlowError.invalidFile(path: source, problem: "missing key \(key)")
        }
        guard let value = cast(raw) else {
            throw StarFlowError.invalidFile(path: source, problem: "\(key) has the wrong type (\(raw))")
        }
        return value
    }

    private static func integer(_ raw: Any) -> Int? {
        guard let number = raw as? NSNumber else { return raw as? Int }
        let value = number.doubleValue
        return value.rounded() == value ? number.intValue : nil
    }
}
