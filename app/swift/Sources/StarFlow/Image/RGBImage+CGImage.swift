#if canImport(CoreGraphics)
import CoreGraphics
import Foundation

extension RGBImage {
    /// The pixels as an sRGB `CGImage` (RGBX, 8 bits per channel), for SwiftUI and ImageIO.
    public func makeCGImage() -> CGImage? {
        guard let provider = CGDataProvider(data: Data(rgbaPixels) as CFData),
              let colorSpace = CGColorSpace(name: CGColorSpace.sRGB) else { return nil }
        return CGImage(width: width, height: height, bitsPerComponent: 8, bitsPerPixel: 32, bytesPerRow: width * 4,
                       space: colorSpace, bitmapInfo: CGBitmapInfo(rawValue: CGImageAlphaInfo.noneSkipLast.rawValue),
                       provider: provider, decode: nil, shouldInterpolate: false, intent: .defaultIntent)
    }
}

extension GeneratedImage {
    public var cgImage: CGImage? { image.makeCGImage() }
}
#endif
