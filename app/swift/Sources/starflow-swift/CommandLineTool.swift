import Foundation
import StarFlow

/// The `starflow-swift` front end: dispatches a subcommand and turns every failure into one
/// line on stderr with exit status 1 (a problem with files or platform) or 2 (a usage mistake).
struct CommandLineTool {
    var output: (String) -> Void = { print($0) }
    var errorOutput: (String) -> Void = { FileHandle.standardError.write(Data(($0 + "\n").utf8)) }

    static let usage = """
        usage:
          \(GenerateCommand.usage)
          \(TokenizeCommand.usage)
        """

    func run(_ arguments: [String]) async -> Int32 {
        guard let command = arguments.first else {
            errorOutput(Self.usage)
            return 2
        }
        let rest = Array(arguments.dropFirst())
        do {
            switch command {
            case "generate": try await GenerateCommand.run(rest, output: output)
            case "tokenize": try TokenizeCommand.run(rest, output: output)
            case "help", "--help", "-h": output(Self.usage)
            default: throw UsageError("unknown command \(command)")
            }
            return 0
        } catch let error as UsageError {
            errorOutput("error: \(error.description)\n\(Self.usage)")
            return 2
        } catch let error as StarFlowError {
            errorOutput("error: \(error.description)")
            return 1
        } catch is CancellationError {
            errorOutput("error: cancelled")
            return 1
        } catch {
            errorOutput("error: \(error.localizedDescription)")
            return 1
        }
    }
}
