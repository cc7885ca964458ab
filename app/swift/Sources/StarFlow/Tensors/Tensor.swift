/// A dense row-major Float32 array: the one value type that crosses the package's seams
/// (sampler ⇄ flow blocks, Core ML ⇄ Swift, safetensors ⇄ tests).
public struct Tensor: Equatable, Sendable {
    public let shape: [Int]
    public var values: [Float]

    public init(shape: [Int], values: [Float]) {
        precondition(shape.allSatisfy { $0 >= 0 }, "negative dimension in \(shape)")
        precondition(shape.reduce(1, *) == values.count, "\(values.count) values do not fill shape \(shape)")
        self.shape = shape
        self.values = values
    }

    public init(zeros shape: [Int]) {
        self.init(shape: shape, values: [Float](repeating: 0, count: shape.reduce(1, *)))
    }

    public var count: Int { values.count }

    /// Rows `range` of the first axis.
    public func rows(_ range: Range<Int>) -> Tensor {
        let stride = shape.dropFirst().reduce(1, *)
        let slice = values[(range.lowerBound * stride)..<(range.upperBound * stride)]
        return Tensor(shape: [range.count] + shape.dropFirst(), values: Array(slice))
    }

    /// The first-axis concatenation of tensors that agree on every other axis.
    public static func concatenatingRows(_ parts: [Tensor]) -> Tensor {
        precondition(!parts.isEmpty, "nothing to concatenate")
        let inner = Array(parts[0].shape.dropFirst())
        precondition(parts.allSatisfy { Array($0.shape.dropFirst()) == inner }, "row shapes differ")
        let rows = parts.reduce(0) { $0 + $1.shape[0] }
        return Tensor(shape: [rows] + inner, values: parts.flatMap(\.values))
    }

    /// Largest |self − other| over all elements: the fixtures' comparison measure.
    public func maxAbsDifference(_ other: Tensor) -> Float {
        precondition(shape == other.shape, "shapes \(shape) and \(other.shape) differ")
        var worst: Float = 0
        for index in values.indices {
            let difference = abs(values[index] - other.values[index])
            if difference > worst || difference.isNaN { worst = difference.isNaN ? .infinity : difference }
        }
        return worst
    }
}
