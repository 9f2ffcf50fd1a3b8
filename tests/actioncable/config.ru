# A real Rails ActionCable server with a RoomChannel written the way Chatwoot's is
# (app/channels/room_channel.rb, Chatwoot 4.x): the user's token stream, the account stream for
# agents, the contact's token stream, and silence (no confirm, no reject, no events) for a token
# that is unknown, an agent whose user_id does not match, or an account the user is not in,
# because Chatwoot's lookups raise inside `subscribed`. The bridge's tests run it with Debian's
# ruby-actioncable and puma (tests/actioncable.rs), so that what the mock Chatwoot does is checked
# against the real protocol implementation.
#
# Besides /cable, loopback test controls (JSON in, JSON out):
#   GET  /test/ready                      200 once the app runs
#   POST /test/broadcast {stream, event, data}   ActionCable.server.broadcast(stream, {event:, data:})
#   POST /test/rotate {user_id, pubsub_token}    the user's pubsub token changes (Chatwoot does this
#                                                when the user changes password)
#   GET  /api/v1/profile (header api_access_token)  the user's id, pubsub_token and accounts
# The people are in PEOPLE below; tests address streams by token and by "account_<id>".

require "json"
require "logger"
require "action_cable"

PEOPLE = {
  users: [
    { id: 1, pubsub_token: "agent-token-1", api_access_token: "api-1", accounts: [1] },
    { id: 2, pubsub_token: "agent-token-2", api_access_token: "api-2", accounts: [1, 2] }
  ],
  contacts: [
    { pubsub_token: "contact-token-1", account: 1 }
  ]
}.freeze

# What Chatwoot keeps in Postgres, in memory: users' tokens change on rotation.
class Store
  # ROTATED="1=new-token,2=..." starts with those users' tokens rotated already: a Chatwoot that
  # restarted after a password change.
  def initialize(rotated = ENV.fetch("ROTATED", ""))
    @lock = Mutex.new
    @users = PEOPLE[:users].map(&:dup)
    rotated.split(",").each do |pair|
      user_id, token = pair.split("=", 2)
      rotate(user_id, token)
    end
  end

  # Chatwoot: User.find_by!(pubsub_token:, id:), raising when there is none.
  def user!(pubsub_token, user_id)
    @lock.synchronize do
      @users.find { |u| u[:pubsub_token] == pubsub_token && u[:id].to_s == user_id.to_s }.dup
    end || raise(KeyError, "no user with this pubsub token and id")
  end

  # Chatwoot: ContactInbox.find_by!(pubsub_token:).contact
  def contact!(pubsub_token)
    PEOPLE[:contacts].find { |c| c[:pubsub_token] == pubsub_token } ||
      raise(KeyError, "no contact with this pubsub token")
  end

  # Chatwoot: current_user.accounts.find(params[:account_id])
  def account!(user, account_id)
    user[:accounts].find { |a| a.to_s == account_id.to_s } || raise(KeyError, "not in this account")
  end

  def by_api_token(api_access_token)
    @lock.synchronize { @users.find { |u| u[:api_access_token] == api_access_token }.dup }
  end

  def rotate(user_id, pubsub_token)
    @lock.synchronize do
      user = @users.find { |u| u[:id].to_s == user_id.to_s } || raise(KeyError, "no such user")
      user[:pubsub_token] = pubsub_token
    end
  end
end

STORE = Store.new

module ApplicationCable
  # Chatwoot's connection identifies nobody: every socket is accepted.
  class Connection < ActionCable::Connection::Base
  end

  class Channel < ActionCable::Channel::Base
  end
end

class RoomChannel < ApplicationCable::Channel
  def subscribed
    current_user
    current_account
    ensure_stream
    broadcast_presence
  end

  def update_presence
    broadcast_presence
  end

  private

  def pubsub_token
    @pubsub_token ||= params[:pubsub_token]
  end

  def ensure_stream
    stream_from pubsub_token
    stream_from "account_#{current_account}" if current_account
  end

  def current_user
    @current_user ||=
      if params[:user_id].blank?
        STORE.contact!(pubsub_token).merge(kind: :contact)
      else
        STORE.user!(pubsub_token, params[:user_id]).merge(kind: :user)
      end
  end

  def current_account
    return if current_user[:kind] == :contact

    @current_account ||= STORE.account!(current_user, params[:account_id])
  end

  def broadcast_presence
    return unless current_account

    data = { account_id: current_account, users: { current_user[:id].to_s => "online" }, contacts: {} }
    ActionCable.server.broadcast(pubsub_token, { event: "presence.update", data: data })
  end
end

ActionCable.server.config.cable = { "adapter" => "async" }
ActionCable.server.config.connection_class = -> { ApplicationCable::Connection }
ActionCable.server.config.disable_request_forgery_protection = true
ActionCable.server.config.logger = Logger.new($stderr, level: Logger::WARN)
ActionCable.server.config.worker_pool_size = 4

# The test controls and the profile endpoint.
class Controls
  def call(env)
    request = Rack::Request.new(env)
    case [request.request_method, request.path_info]
    when ["GET", "/test/ready"] then json(200, ready: true)
    when ["POST", "/test/broadcast"] then broadcast(body(request))
    when ["POST", "/test/rotate"] then rotate(body(request))
    when ["GET", "/api/v1/profile"] then profile(env["HTTP_API_ACCESS_TOKEN"])
    else json(404, error: "not found")
    end
  rescue KeyError, JSON::ParserError => e
    json(422, error: e.message)
  end

  private

  def body(request)
    JSON.parse(request.body.read(64 * 1024) || "{}")
  end

  def broadcast(message)
    ActionCable.server.broadcast(message.fetch("stream"), { event: message.fetch("event"), data: message.fetch("data") })
    json(200, broadcast: true)
  end

  def rotate(message)
    STORE.rotate(message.fetch("user_id"), message.fetch("pubsub_token"))
    json(200, rotated: true)
  end

  def profile(api_access_token)
    user = api_access_token && STORE.by_api_token(api_access_token)
    return json(401, errors: ["Invalid Access Token"]) unless user

    accounts = user[:accounts].map { |id| { id: id, name: "Account #{id}", role: "agent" } }
    json(200, id: user[:id], pubsub_token: user[:pubsub_token], accounts: accounts)
  end

  def json(status, value)
    [status, { "Content-Type" => "application/json" }, [JSON.generate(value)]]
  end
end

map("/cable") { run ActionCable.server }
run Controls.new
