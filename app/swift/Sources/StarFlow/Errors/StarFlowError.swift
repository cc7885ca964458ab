import Foundation

/// A problem with the caller's files, arguments or platform. Every case prints as one line
/// that names the file or value at fault and says how to fix it.
public enum StarFlowError: Error, Equatable, CustomStringConvertible, LocalizedError {
    /// A file or folder the model needs is not there.
    case fileNotFound(path: String, fix: String)
    /// A file exists but its content cannot be used (bad header, bad JSON, unsupported section).
    case invalidFile(path: String, problem: String)
    /// A weights file lacks tensors the config needs, or holds tensors it does not describe.
    case weightsMismatch(path: String, missing: [String], unexpected: [String])
    /// A tensor has another shape than the config or manifest says.
    case shapeMismatch(path: String, name: String, expected: [Int], actual: [Int])
    /// A Core ML package declares other inputs or outputs than the manifest.
    case interfaceMismatch(path: String, problem: String)
    /// A class label the model was not trained on.
    case unknownLabel(String, known: [String])
    /// An argument outside what the model or sampler supports.
    case invalidArgument(String)
    /// Core ML is needed but this platform does not have it.
    case coreMLUnavailable
    /// Core ML refused to load or run a package.
    case coreMLFailure(path: String, message: String)

    public var description: String {
        switch self {
        case let .fileNotFound(path, fix):
            return "\(path) not found; \(fix)"
        case let .invalidFile(path, problem):
            return "\(path): \(problem)"
        case let .weightsMismatch(path, missing, unexpected):
            var parts: [String] = []
            if !missing.isEmpty { parts.append("missing \(Self.list(missing))") }
            if !unexpected.isEmpty { parts.append("unexpected \(Self.list(unexpected))") }
            return "\(path): \(parts.joined(separator: "; ")); convert the model again with `starflow convert`"
        case let .shapeMismatch(path, name, expected, actual):
            return "\(path): \(name) has shape \(actual), expected \(expected); convert or export the model again"
        case let .interfaceMismatch(path, problem):
            return "\(path): \(problem); export the model again with `starflow export-coreml`"
        case let .unknownLabel(label, known):
            return "unknown label \"\(label)\"; this model knows: \(known.joined(separator: ", "))"
        case let .invalidArgument(message):
            return message
        case .coreMLUnavailable:
            return "Core ML is not available on this platform; run on macOS 15 or iOS 18 and later"
        case let .coreMLFailure(path, message):
            return "\(path): Core ML failed (\(message)); check the package and the compute units"
        }
    }

    public var errorDescription: String? { description }

    private static func list(_ names: [String]) -> String {
        let shown = names.prefix(8).joined(separator: ", ")
        return names.count > 8 ? "\(shown) and \(names.count - 8) more" : shown
    }
}
