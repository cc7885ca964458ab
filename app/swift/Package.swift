// swift-tools-version:6.0
// The StarFlow Swift package: tokenizer, flow sampler and Core ML backends for exported STARFlow models.
// It depends on the toolchain only, so it builds and tests on Linux; Core ML code sits behind
// `#if canImport(CoreML)`. SampleApp/ is an Xcode app folder and not part of this package.
import PackageDescription

let package = Package(
    name: "StarFlow",
    platforms: [.macOS(.v15), .iOS(.v18)],
    products: [
        .library(name: "StarFlow", targets: ["StarFlow"]),
        .executable(name: "starflow-swift", targets: ["starflow-swift"]),
    ],
    targets: [
        .target(name: "StarFlow"),
        // The plain-Swift reference backend: the tests' oracle, not a product, so apps never ship it.
        .target(name: "StarFlowReference", dependencies: ["StarFlow"]),
        .executableTarget(name: "starflow-swift", dependencies: ["StarFlow"]),
        .testTarget(name: "StarFlowTests", dependencies: ["StarFlow", "StarFlowReference", "starflow-swift"]),
    ],
    swiftLanguageModes: [.v5]
)
