import Foundation
import Testing
@testable import StarFlow

/// Decoder output → bytes with the official rounding (clamp to [−1, 1], ⌊(v+1)/2·255 + 0.5⌋), and
/// the PNG writer's container format.
struct ImageTests {
    @Test func decodedValuesRoundLikeTheOfficialWriter() throws {
        // Per channel: −1 → 0, 1 → 255, 0 → ⌊127.5 + 0.5⌋ = 128, 0.5 → ⌊191.25 + 0.5⌋ = 191,
        // −0.5 → ⌊63.75 + 0.5⌋ = 64, and values outside [−1, 1] clamp.
        let plane: [Float] = [-1, 1, 0, 0.5, -3, 7]
        let image = try RGBImage(decoded: Tensor(shape: [1, 3, 2, 3], values: plane + plane.map { -$0 } + plane))
        #expect(image.width == 3 && image.height == 2)
        let red = stride(from: 0, to: 18, by: 3).map { image.pixels[$0] }
        let green = stride(from: 1, to: 18, by: 3).map { image.pixels[$0] }
        #expect(red == [0, 255, 128, 191, 0, 255])
        #expect(green == [255, 0, 128, 64, 255, 0])
        #expect(image.rgbaPixels.count == 24 && image.rgbaPixels[3] == 255)
    }

    @Test func otherShapesAreRefused() {
        #expect(throws: StarFlowError.self) { try RGBImage(decoded: Tensor(zeros: [2, 3, 4, 4])) }
        #expect(throws: StarFlowError.self) { try RGBImage(decoded: Tensor(zeros: [1, 4, 4, 4])) }
    }

    @Test func pngHasTheStandardContainer() {
        let image = RGBImage(width: 2, height: 1, pixels: [255, 0, 0, 0, 0, 255])
        let png = [UInt8](PNGEncoder.encode(image))
        #expect(Array(png[0..<8]) == [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A])
        #expect(Array(png[12..<16]) == Array("IHDR".utf8))
        #expect(Array(png[16..<29]) == [0, 0, 0, 2, 0, 0, 0, 1, 8, 2, 0, 0, 0])
        // Every PNG ends with the same empty IEND chunk and its CRC AE 42 60 82.
        #expect(Array(png.suffix(12)) == [0, 0, 0, 0, 0x49, 0x45, 0x4E, 0x44, 0xAE, 0x42, 0x60, 0x82])
        // The stored deflate block holds the filter byte and the pixels of each row.
        let scanline: [UInt8] = [0, 255, 0, 0, 0, 0, 255]
        #expect(png.firstRange(of: scanline) != nil)
    }

    @Test func pngIsWrittenToTheGivenPath() throws {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("starflow-\(UUID().uuidString).png")
        defer { try? FileManager.default.removeItem(at: url) }
        try PNGEncoder.write(RGBImage(width: 1, height: 1, pixels: [1, 2, 3]), to: url)
        #expect(FileManager.default.fileExists(atPath: url.path))
        #expect(throws: StarFlowError.self) {
            try PNGEncoder.write(RGBImage(width: 1, height: 1, pixels: [1, 2, 3]), to: URL(fileURLWithPath: "/nonexistent/dir/x.png"))
        }
    }
}
