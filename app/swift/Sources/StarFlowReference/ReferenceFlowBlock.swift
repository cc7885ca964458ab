import Foundation
import StarFlow

/// A flow block computed with plain Swift loops in Float32: the test oracle for the sampler and
/// a readable statement of the math. It is far too slow for real models; use the Core ML backend.
public final class ReferenceFlowBlock: FlowBlock {
    struct Weights {
        let sos: [Float]
        let projIn: Linear
        let projText: Linear?
        let layers: [ReferenceTransformerLayer]
        let finalNorm: UnitOffsetRMSNorm?
        let projOut: Linear
    }

    public let flipped: Bool
    public let tokenCount: Int
    public let maxChunkSize = Int.max
    public var sos: [Float] { weights.sos }
    public var hasText: Bool { weights.projText != nil }
    public var tokenChannels: Int { config.tokenChannels }

    private let weights: Weights
    private let config: FlowModelConfig
    private let textLength: Int
    private let rope: RotaryTable
    private var rows = 0
    private var caches: [KeyValueCache] = []

    init(weights: Weights, config: FlowModelConfig, flipped: Bool, gridHeight: Int, gridWidth: Int) {
        self.weights = weights
        self.config = config
        self.flipped = flipped
        tokenCount = gridHeight * gridWidth
        textLength = weights.projText == nil ? 0 : config.txtSize
        rope = RotaryTable(height: gridHeight, width: gridWidth, textLength: textLength, ptSeqLen: config.ptSeqLen,
                           headDim: config.headDim, theta: config.ropeTheta, textAxis: config.txtSize > 0)
    }

    public func reset(rows: Int) throws {
        guard rows > 0 else { throw StarFlowError.invalidArgument("a flow block needs at least one row, got \(rows)") }
        self.rows = rows
        caches = weights.layers.map { _ in
            KeyValueCache(rows: rows, heads: config.numHeads, length: textLength + tokenCount, headDim: config.headDim)
        }
    }

    public func prefill(text: Tensor) throws {
        guard let projText = weights.projText else {
            throw StarFlowError.invalidArgument("this flow block has no condition input; only the deep block is prefilled")
        }
        let expected = [rows, textLength, config.txtDim]
        guard text.shape == expected else {
            throw StarFlowError.invalidArgument("condition states must have shape \(expected) (rows, text length, dim), got \(text.shape)")
        }
        _ = runLayers(projText(text.values), position: 0)
    }

    public func step(tokens: Tensor, position: Int) throws -> (scaleLogit: Tensor, shift: Tensor) {
        let channels = config.tokenChannels
        guard tokens.shape.count == 3, tokens.shape[0] == rows, tokens.shape[2] == channels, !caches.isEmpty else {
            throw StarFlowError.invalidArgument("step tokens must have shape [\(rows), n, \(channels)] after reset(rows:), got \(tokens.shape)")
        }
        let count = tokens.shape[1]
        guard position >= 0, position + count <= textLength + tokenCount else {
            throw StarFlowError.invalidArgument("a chunk of \(count) tokens at position \(position) runs past the cache of \(textLength + tokenCount) entries")
        }
        var hidden = runLayers(weights.projIn(tokens.values), position: position)
        if let finalNorm = weights.finalNorm { hidden = finalNorm(hidden) }
        let projected = weights.projOut(hidden)
        let bound = config.softClip
        var scaleLogit: [Float] = [], shift: [Float] = []
        scaleLogit.reserveCapacity(tokens.count)
        shift.reserveCapacity(tokens.count)
        for start in stride(from: 0, to: projected.count, by: 2 * channels) {
            for index in 0..<(2 * channels) {
                let raw = projected[start + index]
                let clipped = bound > 0 ? bound * tanh(raw / bound) : raw
                if index < channels { scaleLogit.append(clipped) } else { shift.append(clipped) }
            }
        }
        return (Tensor(shape: tokens.shape, values: scaleLogit), Tensor(shape: tokens.shape, values: shift))
    }

    private func runLayers(_ input: [Float], position: Int) -> [Float] {
        var hidden = input
        for index in weights.layers.indices {
            hidden = weights.layers[index](hidden, rows: rows, position: position, rope: rope, cache: &caches[index])
        }
        return hidden
    }
}
