import Foundation

/// A safetensors file: an 8-byte little-endian header length, a JSON header naming each
/// tensor's dtype, shape and byte range, then the raw data. Floats of any stored precision
/// come back as Float32; integers as Int.
public struct SafeTensorsFile {
    public enum DType: String, Sendable {
        case f32 = "F32", f16 = "F16", bf16 = "BF16", i32 = "I32", i64 = "I64"

        var byteCount: Int {
            switch self {
            case .f16, .bf16: return 2
            case .f32, .i32: return 4
            case .i64: return 8
            }
        }
    }

    public struct Entry: Sendable {
        public let dtype: DType
        public let shape: [Int]
        let byteRange: Range<Int>
    }

    public let path: String
    public let entries: [String: Entry]
    /// The header's `__metadata__` strings (empty when the file has none).
    public let metadata: [String: String]
    private let data: Data
    private let dataStart: Int

    public init(contentsOf url: URL) throws {
        path = url.path
        guard FileManager.default.fileExists(atPath: url.path) else {
            throw StarFlowError.fileNotFound(path: url.path, fix: "check the path, or convert the model again")
        }
        do {
            data = try Data(contentsOf: url, options: .mappedIfSafe)
        } catch {
            throw StarFlowError.invalidFile(path: url.path, problem: "cannot be read (\(error.localizedDescription))")
        }
        let headerLength = try Self.headerLength(data, path: url.path)
        dataStart = 8 + headerLength
        (entries, metadata) = try Self.parseHeader(data[8..<dataStart], payloadBytes: data.count - dataStart, path: url.path)
    }

    public var names: [String] { entries.keys.sorted() }

    /// A floating-point tensor, converted to Float32.
    public func tensor(_ name: String) throws -> Tensor {
        let entry = try self.entry(name)
        let count = entry.shape.reduce(1, *)
        let start = dataStart + entry.byteRange.lowerBound
        let values: [Float] = try data.withUnsafeBytes { raw in
            switch entry.dtype {
            case .f32:
                return (0..<count).map { Float(bitPattern: UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: start + 4 * $0, as: UInt32.self))) }
            case .f16:
                return (0..<count).map { FloatBits.float(fromHalf: UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: start + 2 * $0, as: UInt16.self))) }
            case .bf16:
                return (0..<count).map { FloatBits.float(fromBFloat16: UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: start + 2 * $0, as: UInt16.self))) }
            case .i32, .i64:
                throw StarFlowError.invalidFile(path: path, problem: "\(name) holds integers (\(entry.dtype.rawValue)); read it with integers(_:)")
            }
        }
        return Tensor(shape: entry.shape, values: values)
    }

    /// An integer tensor (I32 or I64) as Int values, with its shape.
    public func integers(_ name: String) throws -> (shape: [Int], values: [Int]) {
        let entry = try self.entry(name)
        let count = entry.shape.reduce(1, *)
        let start = dataStart + entry.byteRange.lowerBound
        switch entry.dtype {
        case .i32:
            let values = data.withUnsafeBytes { raw in
                (0..<count).map { Int(Int32(littleEndian: raw.loadUnaligned(fromByteOffset: start + 4 * $0, as: Int32.self))) }
            }
            return (entry.shape, values)
        case .i64:
            let values = data.withUnsafeBytes { raw in
                (0..<count).map { Int(Int64(littleEndian: raw.loadUnaligned(fromByteOffset: start + 8 * $0, as: Int64.self))) }
            }
            return (entry.shape, values)
        case .f32, .f16, .bf16:
            throw StarFlowError.invalidFile(path: path, problem: "\(name) holds floats (\(entry.dtype.rawValue)); read it with tensor(_:)")
        }
    }

    private func entry(_ name: String) throws -> Entry {
        guard let entry = entries[name] else {
            throw StarFlowError.weightsMismatch(path: path, missing: [name], unexpected: [])
        }
        return entry
    }

    private static func headerLength(_ data: Data, path: String) throws -> Int {
        guard data.count >= 8 else {
            throw StarFlowError.invalidFile(path: path, problem: "is too short to be a safetensors file")
        }
        let length = data.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: 0, as: UInt64.self)) }
        guard length <= UInt64(data.count - 8) else {
            throw StarFlowError.invalidFile(path: path, problem: "header length \(length) runs past the end of the file; the file is truncated or not safetensors")
        }
        return Int(length)
    }

    private static func parseHeader(_ header: Data, payloadBytes: Int, path: String) throws -> ([String: Entry], [String: String]) {
        guard let json = try? JSONSerialization.jsonObject(with: header) as? [String: Any] else {
            throw StarFlowError.invalidFile(path: path, problem: "the safetensors header is not a JSON object")
        }
        var entries: [String: Entry] = [:]
        for (name, value) in json where name != "__metadata__" {
            entries[name] = try parseEntry(name, value, payloadBytes: payloadBytes, path: path)
        }
        guard let raw = json["__metadata__"] else { return (entries, [:]) }
        guard let metadata = raw as? [String: String] else {
            throw StarFlowError.invalidFile(path: path, problem: "the safetensors __metadata__ is not a map of strings")
        }
        return (entries, metadata)
    }

    private static func parseEntry(_ name: String, _ value: Any, payloadBytes: Int, path: String) throws -> Entry {
        guard let fields = value as? [String: Any],
              let dtypeName = fields["dtype"] as? String,
              let shapeValues = fields["shape"] as? [Any],
              let offsetValues = fields["data_offsets"] as? [Any]
        else {
            throw StarFlowError.invalidFile(path: path, problem: "header entry \(name) lacks dtype, shape or data_offsets")
        }
        guard let dtype = DType(rawValue: dtypeName) else {
            throw StarFlowError.invalidFile(path: path, problem: "\(name) has dtype \(dtypeName); supported: F32, F16, BF16, I32, I64")
        }
        let shape = shapeValues.compactMap(integer)
        let offsets = offsetValues.compactMap(integer)
        guard shape.count == shapeValues.count, shape.allSatisfy({ $0 >= 0 }), offsets.count == 2 else {
            throw StarFlowError.invalidFile(path: path, problem: "\(name) has a malformed shape or data_offsets")
        }
        let expectedBytes = shape.reduce(1, *) * dtype.byteCount
        guard offsets[0] >= 0, offsets[1] - offsets[0] == expectedBytes, offsets[1] <= payloadBytes else {
            throw StarFlowError.invalidFile(path: path, problem: "\(name): data_offsets \(offsets) do not hold \(shape) \(dtypeName) values inside the file")
        }
        return Entry(dtype: dtype, shape: shape, byteRange: offsets[0]..<offsets[1])
    }

    private static func integer(_ value: Any) -> Int? {
        if let number = value as? Int { return number }
        if let number = value as? NSNumber { return number.intValue }
        return nil
    }
}
