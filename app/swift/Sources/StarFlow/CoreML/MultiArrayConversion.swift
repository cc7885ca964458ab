#if canImport(CoreML)
import CoreML
import Foundation

/// Tensor ⇄ MLMultiArray. Inputs are written in the data type the model declares (Float32 or
/// Float16, converted by hand so Intel Macs work too); every access goes through the array's
/// strides, because Core ML may hand back padded outputs.
extension MLMultiArray {
    static func make(_ tensor: Tensor, dataType: MLMultiArrayDataType) throws -> MLMultiArray {
        let array = try MLMultiArray(shape: tensor.shape.map { NSNumber(value: $0) }, dataType: dataType)
        let base = array.dataPointer
        let offsets = array.storageOffsets()
        switch dataType {
        case .float32:
            for (index, offset) in offsets.enumerated() { base.storeBytes(of: tensor.values[index], toByteOffset: offset * 4, as: Float.self) }
        case .float16:
            for (index, offset) in offsets.enumerated() { base.storeBytes(of: FloatBits.half(from: tensor.values[index]), toByteOffset: offset * 2, as: UInt16.self) }
        case .double:
            for (index, offset) in offsets.enumerated() { base.storeBytes(of: Double(tensor.values[index]), toByteOffset: offset * 8, as: Double.self) }
        default:
            throw StarFlowError.invalidArgument("cannot feed Float values to a Core ML input of data type \(dataType.rawValue)")
        }
        return array
    }

    /// An array of zeros (Core ML does not promise zeroed memory).
    static func zeros(shape: [Int], dataType: MLMultiArrayDataType) throws -> MLMultiArray {
        let array = try MLMultiArray(shape: shape.map { NSNumber(value: $0) }, dataType: dataType)
        let bytes: Int
        switch dataType {
        case .float16: bytes = 2
        case .double: bytes = 8
        default: bytes = 4
        }
        let elements = zip(array.shape, array.strides).map { ($0.intValue - 1) * $1.intValue }.reduce(0, +) + 1
        memset(array.dataPointer, 0, elements * bytes)
        return array
    }

    static func make(int32 values: [Int32], shape: [Int]) throws -> MLMultiArray {
        let array = try MLMultiArray(shape: shape.map { NSNumber(value: $0) }, dataType: .int32)
        let base = array.dataPointer
        for (index, offset) in array.storageOffsets().enumerated() {
            base.storeBytes(of: values[index], toByteOffset: offset * 4, as: Int32.self)
        }
        return array
    }

    /// The array's values in logical row-major order, whatever its strides and float type.
    func tensor() throws -> Tensor {
        let base = UnsafeRawPointer(dataPointer)
        let read: (Int) -> Float
        switch dataType {
        case .float32: read = { base.load(fromByteOffset: $0 * 4, as: Float.self) }
        case .float16: read = { FloatBits.float(fromHalf: base.load(fromByteOffset: $0 * 2, as: UInt16.self)) }
        case .double: read = { Float(base.load(fromByteOffset: $0 * 8, as: Double.self)) }
        default:
            throw StarFlowError.invalidArgument("cannot read a Core ML output of data type \(dataType.rawValue) as Float")
        }
        return Tensor(shape: shape.map(\.intValue), values: storageOffsets().map(read))
    }

    /// The element offset in storage of each logical (row-major) index.
    private func storageOffsets() -> [Int] {
        let dims = shape.map(\.intValue), steps = strides.map(\.intValue)
        return (0..<dims.reduce(1, *)).map { index in
            var remainder = index, offset = 0
            for axis in dims.indices.reversed() {
                offset += (remainder % dims[axis]) * steps[axis]
                remainder /= dims[axis]
            }
            return offset
        }
    }
}
#endif
