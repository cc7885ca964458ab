import Foundation

/// A minimal PNG writer (8-bit RGB, uncompressed deflate blocks) so that the command-line tool
/// and the tests can write images on every platform without ImageIO.
public enum PNGEncoder {
    public static func encode(_ image: RGBImage) -> Data {
        var png = Data([0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A])
        var header = Data()
        header.appendBigEndian(UInt32(image.width))
        header.appendBigEndian(UInt32(image.height))
        header.append(contentsOf: [8, 2, 0, 0, 0])
        png.appendChunk("IHDR", header)
        png.appendChunk("IDAT", zlibStored(scanlines(image)))
        png.appendChunk("IEND", Data())
        return png
    }

    /// Writes the PNG next to `url` and renames it into place, so a failure leaves no partial file.
    public static func write(_ image: RGBImage, to url: URL) throws {
        do {
            try encode(image).write(to: url, options: .atomic)
        } catch {
            throw StarFlowError.invalidArgument("cannot write \(url.path) (\(error.localizedDescription)); check the folder exists and is writable")
        }
    }

    /// Each row prefixed with filter type 0 (none).
    private static func scanlines(_ image: RGBImage) -> [UInt8] {
        let rowBytes = image.width * 3
        var bytes: [UInt8] = []
        bytes.reserveCapacity(image.height * (rowBytes + 1))
        for row in 0..<image.height {
            bytes.append(0)
            bytes.append(contentsOf: image.pixels[(row * rowBytes)..<((row + 1) * rowBytes)])
        }
        return bytes
    }

    /// A zlib stream of stored (uncompressed) deflate blocks of at most 65535 bytes.
    private static func zlibStored(_ bytes: [UInt8]) -> Data {
        var stream = Data([0x78, 0x01])
        var offset = 0
        repeat {
            let length = min(65_535, bytes.count - offset)
            let final: UInt8 = offset + length == bytes.count ? 1 : 0
            stream.append(final)
            stream.append(contentsOf: [UInt8(length & 0xFF), UInt8(length >> 8), UInt8(~length & 0xFF), UInt8((~length >> 8) & 0xFF)])
            stream.append(contentsOf: bytes[offset..<(offset + length)])
            offset += length
        } while offset < bytes.count
        stream.appendBigEndian(adler32(bytes))
        return stream
    }

    private static func adler32(_ bytes: [UInt8]) -> UInt32 {
        var a: UInt32 = 1, b: UInt32 = 0
        for byte in bytes {
            a = (a + UInt32(byte)) % 65_521
            b = (b + a) % 65_521
        }
        return b << 16 | a
    }

    static func crc32<S: Sequence>(_ bytes: S) -> UInt32 where S.Element == UInt8 {
        var crc: UInt32 = 0xFFFF_FFFF
        for byte in bytes {
            crc ^= UInt32(byte)
            for _ in 0..<8 { crc = crc & 1 == 1 ? (crc >> 1) ^ 0xEDB8_8320 : crc >> 1 }
        }
        return ~crc
    }
}

private extension Data {
    mutating func appendBigEndian(_ value: UInt32) {
        append(contentsOf: [UInt8(value >> 24), UInt8((value >> 16) & 0xFF), UInt8((value >> 8) & 0xFF), UInt8(value & 0xFF)])
    }

    mutating func appendChunk(_ type: String, _ body: Data) {
        appendBigEndian(UInt32(body.count))
        let typed = Data(type.utf8) + body
        append(typed)
        appendBigEndian(PNGEncoder.crc32(typed))
    }
}
