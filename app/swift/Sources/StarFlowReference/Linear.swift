import StarFlow

/// y = W·x + b with W stored [out, in] (PyTorch and MLX layout), applied to a batch of vectors.
struct Linear {
    let inputs: Int
    let outputs: Int
    let weight: [Float]
    let bias: [Float]?

    init(_ store: WeightStore, _ name: String, inputs: Int, outputs: Int, bias: Bool) throws {
        self.inputs = inputs
        self.outputs = outputs
        weight = try store.values("\(name).weight", shape: [outputs, inputs])
        self.bias = bias ? try store.values("\(name).bias", shape: [outputs]) : nil
    }

    /// `x` holds `x.count / inputs` vectors back to back; the result as many of width `outputs`.
    func callAsFunction(_ x: [Float]) -> [Float] {
        let vectors = x.count / inputs
        var y = [Float](repeating: 0, count: vectors * outputs)
        let inputs = self.inputs, outputs = self.outputs
        weight.withUnsafeBufferPointer { w in
            x.withUnsafeBufferPointer { xs in
                y.withUnsafeMutableBufferPointer { ys in
                    for vector in 0..<vectors {
                        let xBase = vector * inputs
                        for row in 0..<outputs {
                            let wBase = row * inputs
                            var sum: Float = 0
                            for column in 0..<inputs {
                                sum += w[wBase + column] * xs[xBase + column]
                            }
                            ys[vector * outputs + row] = sum
                        }
                    }
                }
            }
        }
        if let bias {
            for index in y.indices { y[index] += bias[index % outputs] }
        }
        return y
    }
}
