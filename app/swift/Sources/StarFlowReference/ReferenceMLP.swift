import Foundation
import StarFlow

/// Pre-norm feed-forward of a flow layer: LayerNorm → Linear → exact GELU → Linear.
struct ReferenceMLP {
    let norm: LayerNorm
    let fc1: Linear
    let fc2: Linear

    init(_ store: WeightStore, _ name: String, config: FlowModelConfig) throws {
        norm = try LayerNorm(store, "\(name).norm", width: config.channels, eps: config.layerNormEps)
        fc1 = try Linear(store, "\(name).fc1", inputs: config.channels, outputs: config.hiddenChannels, bias: config.useBias)
        fc2 = try Linear(store, "\(name).fc2", inputs: config.hiddenChannels, outputs: config.channels, bias: config.useBias)
    }

    func callAsFunction(_ x: [Float]) -> [Float] {
        fc2(Self.gelu(fc1(norm(x))))
    }

    /// Exact GELU, x·(1 + erf(x/√2))/2 (PyTorch's default, not the tanh approximation).
    static func gelu(_ x: [Float]) -> [Float] {
        let inverseRoot2 = Float(1 / 2.0.squareRoot())
        return x.map { $0 * (1 + erf($0 * inverseRoot2)) / 2 }
    }
}
