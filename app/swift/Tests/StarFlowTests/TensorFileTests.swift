import Foundation
import Testing
@testable import StarFlow

/// The safetensors reader and the half-precision conversions, on files written here with IEEE
/// bit patterns whose values are known (0x3C00 = 1 in binary16, 0x3F80 = 1 in bfloat16, …).
struct TensorFileTests {
    static func write(header: String, payload: [UInt8]) throws -> URL {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("starflow-\(UUID().uuidString).safetensors")
        let json = Array(header.utf8)
        var bytes = withUnsafeBytes(of: UInt64(json.count).littleEndian, Array.init)
        bytes += json + payload
        try Data(bytes).write(to: url)
        return url
    }

    @Test func readsEveryStoredType() throws {
        let header = """
            {"__metadata__": {"format": "pt"},
             "h": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]},
             "b": {"dtype": "BF16", "shape": [2], "data_offsets": [8, 12]},
             "f": {"dtype": "F32", "shape": [1, 1], "data_offsets": [12, 16]},
             "i": {"dtype": "I64", "shape": [2], "data_offsets": [16, 32]},
             "j": {"dtype": "I32", "shape": [1], "data_offsets": [32, 36]}}
            """
        var payload: [UInt8] = [0x00, 0x3C, 0x00, 0xC0, 0x01, 0x00, 0xFF, 0x7B]   // 1, −2, 2⁻²⁴, 65504
        payload += [0x80, 0x3F, 0x40, 0xC0]                                         // 1, −3
        payload += withUnsafeBytes(of: Float(0.25).bitPattern.littleEndian, Array.init)
        payload += withUnsafeBytes(of: Int64(-5).littleEndian, Array.init) + withUnsafeBytes(of: Int64(1 << 40).littleEndian, Array.init)
        payload += withUnsafeBytes(of: Int32(7).littleEndian, Array.init)
        let url = try Self.write(header: header, payload: payload)
        defer { try? FileManager.default.removeItem(at: url) }
        let file = try SafeTensorsFile(contentsOf: url)
        #expect(file.names == ["b", "f", "h", "i", "j"])
        #expect(try file.tensor("h").values == [1, -2, Float(sign: .plus, exponent: -24, significand: 1), 65504])
        #expect(try file.tensor("b").values == [1, -3])
        #expect(try file.tensor("f") == Tensor(shape: [1, 1], values: [0.25]))
        #expect(try file.integers("i").values == [-5, 1 << 40])
        #expect(try file.integers("j").values == [7])
        #expect(throws: StarFlowError.self) { try file.tensor("i") }
        #expect(throws: StarFlowError.self) { try file.tensor("missing") }
    }

    @Test func truncatedFileIsRefusedByName() throws {
        let url = try Self.write(header: #"{"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}"#, payload: [0, 0, 0, 0])
        defer { try? FileManager.default.removeItem(at: url) }
        let error = #expect(throws: StarFlowError.self) { try SafeTensorsFile(contentsOf: url) }
        #expect(error?.description.contains(url.lastPathComponent) == true)
    }

    @Test func unsupportedTypeIsNamed() throws {
        let url = try Self.write(header: #"{"x": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}}"#, payload: [UInt8](repeating: 0, count: 8))
        defer { try? FileManager.default.removeItem(at: url) }
        let error = #expect(throws: StarFlowError.self) { try SafeTensorsFile(contentsOf: url) }
        #expect(error?.description.contains("F64") == true)
    }

    @Test func everyHalfValueSurvivesTheRoundTrip() {
        for bits in UInt16.min...UInt16.max where (bits & 0x7C00) != 0x7C00 || (bits & 0x03FF) == 0 {
            #expect(FloatBits.half(from: FloatBits.float(fromHalf: bits)) == bits)
        }
    }

    @Test func halfRoundsToNearestEven() {
        #expect(FloatBits.half(from: 1 + 0x1p-11) == 0x3C00)
        #expect(FloatBits.half(from: 1 + 3 * 0x1p-11) == 0x3C02)
        #expect(FloatBits.half(from: 65520) == 0x7C00)
        #expect(FloatBits.half(from: 0x1p-25) == 0)
        #expect(FloatBits.half(from: 0x1.8p-25) == 1)
    }
}
