import Foundation
import StarFlow

/// The cos/sin tables of STARFlow's 3-axis rotary embedding for one block's token sequence,
/// computed in Float32 step by step as the MLX runtime (`mlx_starflow/rope.py`) does.
///
/// Sequence index s covers the text prefix first (token i at (0, 0, i·pt/T)), then the image
/// tokens by *sequence index* k = i·w + j at (i·pt/√(hw), j·pt/√(hw), 0) — also in flipped
/// blocks, where RoPE follows the index and not the spatial token. Each position gives
/// head_dim/2 angles: the row and column axes get half−8 frequencies between them, the text
/// axis the last 8, and each angle rotates one interleaved pair (x₂ₘ, x₂ₘ₊₁).
struct RotaryTable {
    static let textAxisDims = 8

    let pairs: Int
    let cos: [Float]
    let sin: [Float]

    var length: Int { cos.count / pairs }

    init(height: Int, width: Int, textLength: Int, ptSeqLen: Int, headDim: Int, theta: Float, textAxis: Bool) {
        let positions = Self.positions(height: height, width: width, textLength: textLength, ptSeqLen: ptSeqLen)
        let frequencies = Self.frequencies(headDim: headDim, theta: theta, textAxis: textAxis)
        pairs = headDim / 2
        var cos: [Float] = []
        var sin: [Float] = []
        cos.reserveCapacity(positions.count * pairs)
        sin.reserveCapacity(positions.count * pairs)
        for position in positions {
            for (axis, frequency) in frequencies {
                let angle = position[axis] * frequency
                cos.append(Float(Foundation.cos(Double(angle))))
                sin.append(Float(Foundation.sin(Double(angle))))
            }
        }
        self.cos = cos
        self.sin = sin
    }

    /// Rotates the interleaved pairs of `vector[offset..<offset+2·pairs]` by the angles of `position`.
    func rotate(_ vector: inout [Float], offset: Int, position: Int) {
        let base = position * pairs
        for pair in 0..<pairs {
            let c = cos[base + pair], s = sin[base + pair]
            let even = vector[offset + 2 * pair], odd = vector[offset + 2 * pair + 1]
            vector[offset + 2 * pair] = even * c - odd * s
            vector[offset + 2 * pair + 1] = odd * c + even * s
        }
    }

    private static func positions(height: Int, width: Int, textLength: Int, ptSeqLen: Int) -> [[Float]] {
        let pt = Float(ptSeqLen)
        let scale = Float(Double(height * width).squareRoot())
        let text = (0..<textLength).map { [0, 0, Float($0) / Float(max(textLength, 1)) * pt] }
        let image = (0..<(height * width)).map { k -> [Float] in
            [Float(k / width) / scale * pt, Float(k % width) / scale * pt, 0]
        }
        return text + image
    }

    /// (axis, frequency) for each rotated pair, in table order.
    private static func frequencies(headDim: Int, theta: Float, textAxis: Bool) -> [(Int, Float)] {
        let half = headDim / 2
        let spatial = textAxis ? half - textAxisDims : half
        let spatialFrequencies = stride(from: 0, to: spatial, by: 2).map {
            1 / Float(Foundation.pow(Double(theta), Double(Float($0) / Float(spatial))))
        }
        var table = spatialFrequencies.map { (0, $0) } + spatialFrequencies.map { (1, $0) }
        if textAxis {
            table += (0..<textAxisDims).map {
                (2, 1 / Float(Foundation.pow(Double(theta), Double(Float($0) / Float(textAxisDims)))))
            }
        }
        return table
    }
}
