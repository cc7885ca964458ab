import StarFlow

/// LayerNorm over the last axis with a learned gain and bias (biased variance, as PyTorch).
struct LayerNorm {
    let width: Int
    let weight: [Float]
    let bias: [Float]
    let eps: Float

    init(_ store: WeightStore, _ name: String, width: Int, eps: Float) throws {
        self.width = width
        self.eps = eps
        weight = try store.values("\(name).weight", shape: [width])
        bias = try store.values("\(name).bias", shape: [width])
    }

    func callAsFunction(_ x: [Float]) -> [Float] {
        var y = x
        for start in stride(from: 0, to: x.count, by: width) {
            var mean: Float = 0
            for i in 0..<width { mean += x[start + i] }
            mean /= Float(width)
            var variance: Float = 0
            for i in 0..<width {
                let centred = x[start + i] - mean
                variance += centred * centred
            }
            variance /= Float(width)
            let scale = 1 / (variance + eps).squareRoot()
            for i in 0..<width {
                y[start + i] = (x[start + i] - mean) * scale * weight[i] + bias[i]
            }
        }
        return y
    }
}

/// RMSNorm scaled by (1 + w): the official flow's final norm (`add_unit_offset=True`).
struct UnitOffsetRMSNorm {
    let width: Int
    let weight: [Float]
    let eps: Float

    init(_ store: WeightStore, _ name: String, width: Int, eps: Float) throws {
        self.width = width
        self.eps = eps
        weight = try store.values("\(name).weight", shape: [width])
    }

    func callAsFunction(_ x: [Float]) -> [Float] {
        var y = x
        for start in stride(from: 0, to: x.count, by: width) {
            var meanSquare: Float = 0
            for i in 0..<width { meanSquare += x[start + i] * x[start + i] }
            meanSquare /= Float(width)
            let scale = 1 / (meanSquare + eps).squareRoot()
            for i in 0..<width {
                y[start + i] = x[start + i] * scale * (1 + weight[i])
            }
        }
        return y
    }
}

