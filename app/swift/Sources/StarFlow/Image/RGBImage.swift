/// An 8-bit RGB image, interleaved row by row: what the pipeline hands back and what the PNG
/// writer, `CGImage` and SwiftUI consume.
public struct RGBImage: Equatable, Sendable {
    public let width: Int
    public let height: Int
    /// width × height × 3 bytes, R G B per pixel, rows top to bottom.
    public let pixels: [UInt8]

    public init(width: Int, height: Int, pixels: [UInt8]) {
        precondition(pixels.count == width * height * 3, "\(pixels.count) bytes do not fill a \(width)×\(height) RGB image")
        self.width = width
        self.height = height
        self.pixels = pixels
    }

    /// The same pixels with an opaque alpha byte after each, for RGBA consumers.
    public var rgbaPixels: [UInt8] {
        var rgba: [UInt8] = []
        rgba.reserveCapacity(width * height * 4)
        for start in stride(from: 0, to: pixels.count, by: 3) {
            rgba.append(contentsOf: pixels[start..<(start + 3)])
            rgba.append(255)
        }
        return rgba
    }

    /// The decoder's (or a pixel-space flow's) output (1, 3, H, W) in [−1, 1] as bytes, rounded
    /// like the official writer: clamp to [−1, 1], map to [0, 1], ⌊v·255 + 0.5⌋, in Float32.
    public init(decoded image: Tensor) throws {
        guard image.shape.count == 4, image.shape[0] == 1, image.shape[1] == 3 else {
            throw StarFlowError.invalidArgument("a decoded image must have shape [1, 3, H, W], got \(image.shape)")
        }
        let height = image.shape[2], width = image.shape[3], plane = height * width
        var pixels = [UInt8](repeating: 0, count: plane * 3)
        for channel in 0..<3 {
            for index in 0..<plane {
                let unit = (min(max(image.values[channel * plane + index], -1), 1) + 1) * 0.5
                let scaled = min(max(unit * 255 + 0.5, 0), 255)
                pixels[index * 3 + channel] = UInt8(scaled)
            }
        }
        self.init(width: width, height: height, pixels: pixels)
    }
}
