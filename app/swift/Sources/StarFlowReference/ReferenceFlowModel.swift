import Foundation
import StarFlow

/// A converted flow folder (`config.json` + `model.safetensors`, as `starflow convert` writes
/// it) loaded for the reference backend. Loading is strict: a missing, unexpected or misshapen
/// tensor is an error naming the file.
public final class ReferenceFlowModel {
    public let config: FlowModelConfig
    private let blockWeights: [ReferenceFlowBlock.Weights]

    /// Loads a flow folder, or the `flow/` folder inside a model folder.
    public init(contentsOf url: URL) throws {
        var folder = url
        var isDirectory: ObjCBool = false
        if FileManager.default.fileExists(atPath: url.appendingPathComponent("flow").path, isDirectory: &isDirectory), isDirectory.boolValue {
            folder = url.appendingPathComponent("flow")
        }
        config = try FlowModelConfig(contentsOf: folder.appendingPathComponent("config.json"))
        let store = WeightStore(file: try SafeTensorsFile(contentsOf: folder.appendingPathComponent("model.safetensors")))
        let config = self.config
        blockWeights = try config.layersPerBlock.enumerated().map { index, layers in
            try Self.loadBlock(store, index: index, layers: layers, deep: index == config.numBlocks - 1, config: config)
        }
        try store.finish()
    }

    /// The blocks in forward order (the last is the deep one) for latents of height × width.
    public func blocks(height: Int, width: Int) throws -> [ReferenceFlowBlock] {
        let p = config.patchSize
        guard height > 0, width > 0, height % p == 0, width % p == 0 else {
            throw StarFlowError.invalidArgument("latent size \(height)×\(width) must be positive multiples of the patch size \(p)")
        }
        return blockWeights.enumerated().map { index, weights in
            ReferenceFlowBlock(weights: weights, config: config, flipped: config.blockIsFlipped(index),
                               gridHeight: height / p, gridWidth: width / p)
        }
    }

    private static func loadBlock(_ store: WeightStore, index: Int, layers: Int, deep: Bool, config: FlowModelConfig) throws -> ReferenceFlowBlock.Weights {
        let name = "blocks.\(index)"
        let tokens = config.tokenChannels
        return ReferenceFlowBlock.Weights(
            sos: try store.values("\(name).sos", shape: [1, 1, tokens]),
            projIn: try Linear(store, "\(name).proj_in", inputs: tokens, outputs: config.channels, bias: true),
            projText: deep && config.txtDim > 0
                ? try Linear(store, "\(name).proj_txt", inputs: config.txtDim, outputs: config.channels, bias: true)
                : nil,
            layers: try (0..<layers).map { try ReferenceTransformerLayer(store, "\(name).layers.\($0)", config: config) },
            finalNorm: config.useFinalNorm ? try UnitOffsetRMSNorm(store, "\(name).final_norm", width: config.channels, eps: config.rmsNormEps) : nil,
            projOut: try Linear(store, "\(name).proj_out", inputs: config.channels, outputs: 2 * tokens, bias: true)
        )
    }
}
