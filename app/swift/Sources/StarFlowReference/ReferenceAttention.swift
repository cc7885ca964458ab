import Foundation
import StarFlow

/// Pre-norm multi-head attention of a flow layer, run on a chunk of tokens against the cache:
/// the chunk's keys and values are stored at its positions, and each query attends to every
/// cache entry up to its own position (the causal mask over [text; image]).
struct ReferenceAttention {
    let channels: Int
    let heads: Int
    let headDim: Int
    let norm: LayerNorm
    let qkv: Linear
    let proj: Linear

    init(_ store: WeightStore, _ name: String, config: FlowModelConfig) throws {
        channels = config.channels
        heads = config.numHeads
        headDim = config.headDim
        norm = try LayerNorm(store, "\(name).norm", width: channels, eps: config.layerNormEps)
        qkv = try Linear(store, "\(name).qkv", inputs: channels, outputs: 3 * channels, bias: config.useBias)
        proj = try Linear(store, "\(name).proj", inputs: channels, outputs: channels, bias: config.useBias)
    }

    /// Attention output for `x` (rows, n, channels) whose first token sits at `position`.
    func callAsFunction(_ x: [Float], rows: Int, position: Int, rope: RotaryTable, cache: inout KeyValueCache) -> [Float] {
        let count = x.count / (rows * channels)
        var projected = qkv(norm(x))
        let width = 3 * channels
        for row in 0..<rows {
            for token in 0..<count {
                let base = (row * count + token) * width
                for head in 0..<heads {
                    rope.rotate(&projected, offset: base + head * headDim, position: position + token)
                    rope.rotate(&projected, offset: base + channels + head * headDim, position: position + token)
                    let slot = cache.offset(row: row, head: head, position: position + token)
                    for d in 0..<headDim {
                        cache.keys[slot + d] = projected[base + channels + head * headDim + d]
                        cache.values[slot + d] = projected[base + 2 * channels + head * headDim + d]
                    }
                }
            }
        }
        var attended = [Float](repeating: 0, count: rows * count * channels)
        let scale = 1 / Float(headDim).squareRoot()
        for row in 0..<rows {
            for token in 0..<count {
                for head in 0..<heads {
                    let query = (row * count + token) * width + head * headDim
                    let output = (row * count + token) * channels + head * headDim
                    attend(projected, query: query, row: row, head: head, last: position + token, scale: scale,
                           cache: cache, into: &attended, at: output)
                }
            }
        }
        return proj(attended)
    }

    private func attend(_ projected: [Float], query: Int, row: Int, head: Int, last: Int, scale: Float,
                        cache: KeyValueCache, into output: inout [Float], at outputOffset: Int) {
        let headDim = self.headDim
        let first = cache.offset(row: row, head: head, position: 0)
        var scores = [Float](repeating: 0, count: last + 1)
        projected.withUnsafeBufferPointer { q in
            cache.keys.withUnsafeBufferPointer { keys in
                for key in 0...last {
                    var dot: Float = 0
                    let keyOffset = first + key * headDim
                    for d in 0..<headDim { dot += q[query + d] * keys[keyOffset + d] }
                    scores[key] = dot * scale
                }
            }
        }
        let maximum = scores.max() ?? 0
        var total: Float = 0
        for key in scores.indices {
            scores[key] = exp(scores[key] - maximum)
            total += scores[key]
        }
        cache.values.withUnsafeBufferPointer { values in
            output.withUnsafeMutableBufferPointer { out in
                for key in 0...last {
                    let weight = scores[key] / total
                    let valueOffset = first + key * headDim
                    for d in 0..<headDim { out[outputOffset + d] += weight * values[valueOffset + d] }
                }
            }
        }
    }
}
