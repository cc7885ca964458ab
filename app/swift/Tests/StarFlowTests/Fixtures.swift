import Foundation
import StarFlow

/// Where the tests find their inputs: the official-code fixtures (`STARFLOW_FIXTURES`, default
/// `../../../shared/fixtures` from this package), the converted tiny flow models
/// (`STARFLOW_SWIFT_MODELS`, default `Tests/Resources/generated/models`) and their Core ML
/// exports (`STARFLOW_SWIFT_EXPORTS`, default `Tests/Resources/generated/exports`); the last
/// two are written by Tests/Resources/make_test_resources.py before `swift test`.
enum Fixtures {
    static let packageRoot = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    static var root: URL {
        if let path = ProcessInfo.processInfo.environment["STARFLOW_FIXTURES"] { return URL(fileURLWithPath: path) }
        return packageRoot.appendingPathComponent("../../../shared/fixtures").standardized
    }

    static var models: URL {
        if let path = ProcessInfo.processInfo.environment["STARFLOW_SWIFT_MODELS"] { return URL(fileURLWithPath: path) }
        return packageRoot.appendingPathComponent("Tests/Resources/generated/models")
    }

    static var exports: URL {
        if let path = ProcessInfo.processInfo.environment["STARFLOW_SWIFT_EXPORTS"] { return URL(fileURLWithPath: path) }
        return packageRoot.appendingPathComponent("Tests/Resources/generated/exports")
    }

    static func file(_ relative: String) throws -> URL {
        let url = root.appendingPathComponent(relative)
        guard FileManager.default.fileExists(atPath: url.path) else {
            throw FixtureMissing(description: "\(url.path) is missing: put the fixtures at ../shared/fixtures beside the repository or set STARFLOW_FIXTURES")
        }
        return url
    }

    /// A converted flow folder, or a model folder with the flow in `flow/` (what `convert_model` writes).
    static func model(_ name: String) throws -> URL {
        let url = models.appendingPathComponent(name)
        let weights = ["model.safetensors", "flow/model.safetensors"].map { url.appendingPathComponent($0).path }
        guard weights.contains(where: FileManager.default.fileExists(atPath:)) else {
            throw FixtureMissing(description: "converted model \(url.path) is missing: run the make step that converts the tiny fixture models, or set STARFLOW_SWIFT_MODELS")
        }
        return url
    }

    /// A noise file written by Tests/Resources/make_test_resources.py (beside the models).
    static func noise(_ name: String) throws -> URL {
        let url = models.deletingLastPathComponent().appendingPathComponent("noise").appendingPathComponent(name)
        guard FileManager.default.fileExists(atPath: url.path) else {
            throw FixtureMissing(description: "\(url.path) is missing: run `.venv/bin/python app/swift/Tests/Resources/make_test_resources.py` from the repository root")
        }
        return url
    }

    /// A Core ML export of a tiny fixture model and the interfaces its packages declare
    /// (`name.interfaces.json`), both written by Tests/Resources/make_test_resources.py.
    static func export(_ name: String) throws -> (folder: URL, interfaces: [String: ModelInterface]) {
        let folder = exports.appendingPathComponent(name)
        let listing = exports.appendingPathComponent("\(name).interfaces.json")
        guard let data = FileManager.default.contents(atPath: listing.path) else {
            throw FixtureMissing(description: "\(listing.path) is missing: run `.venv/bin/python app/swift/Tests/Resources/make_test_resources.py` from the repository root, or set STARFLOW_SWIFT_EXPORTS")
        }
        let json = try JSONDecoder().decode([String: [String: [String: [Int]]]].self, from: data)
        let interfaces = json.mapValues { sides in
            ModelInterface(inputs: (sides["inputs"] ?? [:]).mapValues { $0.map(Optional.some) },
                           outputs: (sides["outputs"] ?? [:]).mapValues { $0.map(Optional.some) })
        }
        return (folder, interfaces)
    }

    static func safetensors(_ relative: String) throws -> SafeTensorsFile {
        try SafeTensorsFile(contentsOf: file(relative))
    }

    static func json(_ relative: String) throws -> [String: Any] {
        let data = try Data(contentsOf: file(relative))
        guard let object = try JSONSerialization.jsonObject(with: data) as? [String: Any] else {
            throw FixtureMissing(description: "\(relative) is not a JSON object")
        }
        return object
    }
}

struct FixtureMissing: Error, CustomStringConvertible {
    let description: String
}
